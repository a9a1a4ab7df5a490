//! (kernel family: conv)

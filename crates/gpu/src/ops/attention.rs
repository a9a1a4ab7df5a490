//! (kernel family: attention)

//! (kernel family: reduce)

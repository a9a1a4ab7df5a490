//! (kernel family: embed)

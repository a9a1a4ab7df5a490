//! (kernel family: norm)

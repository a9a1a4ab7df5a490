//! (kernel family: softmax)

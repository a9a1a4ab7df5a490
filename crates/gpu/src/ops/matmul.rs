//! (kernel family: matmul)

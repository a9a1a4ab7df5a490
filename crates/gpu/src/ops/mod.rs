//! Ops, one module per kernel family. Each op checks shapes and dtypes, picks a kernel variant,
//! and records its dispatch into a [`crate::Batch`]; each has a CPU reference test beside it.

pub mod attention;
pub mod conv;
pub mod decode;
pub mod elementwise;
pub mod embed;
pub mod matmul;
pub mod norm;
pub mod reduce;
pub mod rope;
pub mod softmax;

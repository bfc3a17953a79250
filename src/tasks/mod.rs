//! What the `beit` commands do, as library functions (the CLI is a thin layer over these).

pub mod attention;
pub mod classify;
pub mod embed;
pub mod embed_parquet;
pub mod forward;
pub mod inputs;
pub mod mim;
pub mod preprocess;
pub mod segment;
pub mod shard;

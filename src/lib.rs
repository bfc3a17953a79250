//! beit-rs: the BEiT vision-transformer family in Rust, numerically compatible with
//! Hugging Face `transformers`.

pub mod pretrain;
pub mod tokenizer;

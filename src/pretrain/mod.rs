//! Building blocks for BEiT masked-image-modelling pre-training.

pub mod masking;
pub mod mim;
pub mod tokenizer;

pub use mim::{pretrain, pretrain_data_parallel, PretrainConfig, TokenizerSource};

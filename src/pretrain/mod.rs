//! Building blocks for BEiT masked-image-modelling pre-training.

pub mod masking;

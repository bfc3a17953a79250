//! Task heads on top of [`crate::model::BeitModel`], as transformers' `BeitFor*` classes.

pub mod classification;
pub mod mim;
pub mod segmentation;

pub use classification::{BeitForImageClassification, ImageClassifierOutput};
pub use mim::{BeitForMaskedImageModeling, MaskedLMOutput};
pub use segmentation::{
    post_process_semantic_segmentation, BeitForSemanticSegmentation, SemanticSegmenterOutput,
};

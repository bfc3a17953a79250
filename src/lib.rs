//! beit-rs: the BEiT vision-transformer family in Rust, numerically compatible with
//! Hugging Face `transformers`.
//!
//! ```no_run
//! use beit::{AutoModel, ForwardOptions};
//! use candle_core::{DType, Device, Tensor};
//!
//! # fn main() -> beit::Result<()> {
//! let (model, config) = AutoModel::from_pretrained("path/to/beit-base-patch16-224", DType::F32, &Device::Cpu)?;
//! let pixel_values = Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu)?;
//! let out = model.forward(&pixel_values, &ForwardOptions::default())?;
//! let logits = &out.tensors["logits"];
//! # Ok(()) }
//! ```

pub mod auto;
pub mod bench;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod heads;
pub mod hub;
pub mod losses;
pub mod memory;
pub mod model;
pub mod nn;
pub mod ops;
pub mod output;
pub mod pretrain;
pub mod processor;
pub mod profile;
pub mod server;
pub mod tasks;
pub mod tokenizer;
pub mod train;
pub mod util;
pub mod viz;
pub mod weights;

pub use auto::{Architecture, AutoModel, ModelOutputs};
pub use config::BeitConfig;
pub use error::{BeitError, Result};
pub use heads::{
    post_process_semantic_segmentation, BeitForImageClassification, BeitForMaskedImageModeling,
    BeitForSemanticSegmentation,
};
pub use model::{BeitModel, BeitModelOutput, ForwardOptions};

//! Training: trainable models, the optimiser recipe, data, augmentation, metrics and the
//! fine-tuning loops.

pub mod augment;
pub mod checkpoint;
pub mod data;
pub mod distributed;
pub mod finetune;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod trainer;

pub use model::TrainableModel;
pub use optim::{clip_grad_norm, param_groups, AdamW, AdamWConfig, CosineSchedule, Param};

use std::collections::{BTreeMap, HashMap};

use candle_core::{backprop::GradStore, Tensor, Var};

use crate::error::Result;

/// Gradients of `vars` in `grads`, by name (parameters that received none are absent).
pub fn named_grads(grads: &GradStore, vars: &BTreeMap<String, Var>) -> HashMap<String, Tensor> {
    vars.iter()
        .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
        .collect()
}

/// Add `b` into `a` (gradient accumulation).
pub fn accumulate(a: &mut HashMap<String, Tensor>, b: HashMap<String, Tensor>) -> Result<()> {
    for (k, g) in b {
        let sum = match a.remove(&k) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        a.insert(k, sum);
    }
    Ok(())
}

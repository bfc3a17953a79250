//! Training checkpoints: `save_pretrained` layout plus optimiser and trainer state, written to a
//! temporary folder and renamed into place, so a run killed at any moment leaves the last good
//! checkpoint intact.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{BeitError, Result};
use crate::util;

/// Where a run is: enough to continue it exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps done.
    pub step: usize,
    /// Epoch in progress.
    pub epoch: usize,
    /// Batches of `epoch` already consumed.
    pub batch_in_epoch: usize,
    /// The training configuration (a resumed run must use the same).
    pub config: serde_json::Value,
    /// Evaluation history so far (one JSON object per epoch).
    pub history: Vec<serde_json::Value>,
    /// Logged training losses `(step, loss)`.
    pub train_losses: Vec<(usize, f64)>,
}

/// Files of one checkpoint folder.
pub const TRAINER_STATE: &str = "trainer_state.json";
pub const OPTIMIZER_STATE: &str = "optimizer.safetensors";

/// Write a checkpoint as `out/checkpoint-{step}`: everything goes into a hidden temporary folder
/// first (trainer state last), which is then renamed. Older checkpoints beyond `keep` are removed.
pub fn save_checkpoint(
    out: &Path,
    state: &TrainerState,
    write_model: impl FnOnce(&Path) -> Result<()>,
    optimizer: &HashMap<String, Tensor>,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(|e| BeitError::file(out, e.to_string()))?;
    let final_dir = out.join(format!("checkpoint-{}", state.step));
    let tmp = out.join(format!(".checkpoint-{}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| BeitError::file(&tmp, e.to_string()))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| BeitError::file(&tmp, e.to_string()))?;
    write_model(&tmp)?;
    util::save_safetensors(optimizer, &tmp.join(OPTIMIZER_STATE))?;
    let json =
        serde_json::to_string_pretty(state).map_err(|e| BeitError::file(&tmp, e.to_string()))?;
    util::write_atomic(&tmp.join(TRAINER_STATE), json.as_bytes())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .map_err(|e| BeitError::file(&final_dir, e.to_string()))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| BeitError::file(&final_dir, e.to_string()))?;
    // Prune old checkpoints (never the one just written).
    let mut all = list_checkpoints(out);
    all.sort_by_key(|(s, _)| *s);
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            if *p != final_dir {
                let _ = std::fs::remove_dir_all(p);
            }
        }
    }
    Ok(final_dir)
}

/// Complete checkpoints (`checkpoint-N` folders with a trainer state) in `out`.
pub fn list_checkpoints(out: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            let p = e.path();
            p.join(TRAINER_STATE).is_file().then_some((step, p))
        })
        .collect()
}

/// The newest complete checkpoint in `out`.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    list_checkpoints(out)
        .into_iter()
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}

/// Read a checkpoint's trainer and optimiser state.
pub fn load_state(dir: &Path, device: &Device) -> Result<(TrainerState, HashMap<String, Tensor>)> {
    let p = dir.join(TRAINER_STATE);
    let text = crate::util::read_regular_to_string(&p)
        .map_err(|e| BeitError::file(&p, format!("cannot read: {e}")))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| BeitError::file(&p, format!("invalid trainer state: {e}")))?;
    let opt = util::load_safetensors(&dir.join(OPTIMIZER_STATE), device)?;
    Ok((state, opt))
}

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
    /// The run that made the checkpoint (see [`RUN_ID_FILE`]); `None` in checkpoints written
    /// before runs had ids.
    #[serde(default)]
    pub run_id: Option<String>,
    /// Wall-clock and process CPU seconds (user + system) spent so far, over every resume.
    #[serde(default)]
    pub seconds: f64,
    #[serde(default)]
    pub cpu_seconds: f64,
}

/// Files of one checkpoint folder.
pub const TRAINER_STATE: &str = "trainer_state.json";
pub const OPTIMIZER_STATE: &str = "optimizer.safetensors";
/// The id of the run last started in an output folder: `--resume` takes only that run's
/// checkpoints, so that a fresh run into a folder holding an older run's checkpoints, killed
/// before its first save, is not continued from the older run's weights.
pub const RUN_ID_FILE: &str = ".beit-run";

/// A new run id (process id, time and a counter: unique on this machine).
pub fn new_run_id() -> String {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{}-{n}", now.as_nanos(), std::process::id())
}

/// The id of the run last started in `out` (`None`: none recorded).
pub fn folder_run_id(out: &Path) -> Option<String> {
    let id = util::read_regular_to_string(&out.join(RUN_ID_FILE)).ok()?;
    Some(id.trim().to_string()).filter(|s| !s.is_empty())
}

/// Record `id` as the run now writing `out`.
pub fn set_folder_run_id(out: &Path, id: &str) -> Result<()> {
    util::write_atomic(&out.join(RUN_ID_FILE), id.as_bytes())
}

/// The run id a checkpoint records (`None`: an old checkpoint, or an unreadable state).
fn checkpoint_run_id(dir: &Path) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        #[serde(default)]
        run_id: Option<String>,
    }
    let text = util::read_regular_to_string(&dir.join(TRAINER_STATE)).ok()?;
    serde_json::from_str::<Id>(&text).ok()?.run_id
}

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
    prune(out, &final_dir, state.run_id.as_deref(), keep);
    Ok(final_dir)
}

/// Remove this run's checkpoints beyond the `keep` newest (never `just_written`) and what an
/// earlier removal or save killed half-way left: `checkpoint-N` folders without a trainer
/// state and `.checkpoint-N.tmp` / `.checkpoint-N.old` folders. A checkpoint is first renamed
/// to `.checkpoint-N.old`, so a kill while removing it leaves a folder the next save finds.
/// Another run's checkpoints are left alone. Removal is best effort: a failure only leaves a
/// folder for the next save.
fn prune(out: &Path, just_written: &Path, run_id: Option<&str>, keep: usize) {
    let Ok(rd) = std::fs::read_dir(out) else {
        return;
    };
    let mut own = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let p = e.path();
        if p == just_written || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let leftover =
            name.starts_with(".checkpoint-") && (name.ends_with(".tmp") || name.ends_with(".old"));
        if leftover {
            let _ = std::fs::remove_dir_all(&p);
            continue;
        }
        let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if !p.join(TRAINER_STATE).is_file() {
            // Half removed: the trainer state goes last only by chance of the folder order.
            let _ = std::fs::remove_dir_all(&p);
        } else if same_run(checkpoint_run_id(&p).as_deref(), run_id) {
            own.push((step, p));
        }
    }
    own.sort_by_key(|(s, _)| *s);
    let extra = (own.len() + 1).saturating_sub(keep.max(1));
    for (step, p) in own.into_iter().take(extra) {
        let old = out.join(format!(".checkpoint-{step}.old"));
        if std::fs::rename(&p, &old).is_ok() {
            let _ = std::fs::remove_dir_all(&old);
        }
    }
}

/// Whether a checkpoint made by run `ckpt` belongs to run `run` (an unrecorded id on either
/// side, from before runs had ids, matches).
fn same_run(ckpt: Option<&str>, run: Option<&str>) -> bool {
    match (ckpt, run) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
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

/// Checkpoints by step.
pub type Steps = Vec<(usize, PathBuf)>;

/// The complete checkpoints in `out` of the run last started there ([`RUN_ID_FILE`]), and
/// those of other runs.
pub fn run_checkpoints(out: &Path) -> (Steps, Steps) {
    let run = folder_run_id(out);
    list_checkpoints(out)
        .into_iter()
        .partition(|(_, p)| same_run(checkpoint_run_id(p).as_deref(), run.as_deref()))
}

/// The newest complete checkpoint in `out` of the run last started there (another run's are
/// never taken: see [`RUN_ID_FILE`]).
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    run_checkpoints(out)
        .0
        .into_iter()
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}

/// The error for a folder whose only checkpoints are another run's (`foreign` non-empty).
pub fn foreign_checkpoints_error(out: &Path, foreign: &[(usize, PathBuf)]) -> BeitError {
    let newest = foreign.iter().max_by_key(|(s, _)| *s).map(|(_, p)| p);
    BeitError::file(
        out,
        format!(
            "--resume: its checkpoints ({}) belong to an earlier run, not to the run last \
             started here, which saved none; resume that earlier run with --resume {}, or \
             start over with --overwrite",
            foreign
                .iter()
                .map(|(s, _)| format!("checkpoint-{s}"))
                .collect::<Vec<_>>()
                .join(", "),
            newest.map(|p| p.display().to_string()).unwrap_or_default()
        ),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize, run: &str) -> TrainerState {
        TrainerState {
            step,
            epoch: 0,
            batch_in_epoch: 0,
            config: serde_json::Value::Null,
            history: Vec::new(),
            train_losses: Vec::new(),
            run_id: Some(run.to_string()),
            seconds: 0.0,
            cpu_seconds: 0.0,
        }
    }

    fn save(out: &Path, step: usize, run: &str) -> PathBuf {
        save_checkpoint(out, &state(step, run), |_| Ok(()), &HashMap::new(), 2).unwrap()
    }

    /// A kill while an old checkpoint was being removed left a folder no save ever removed
    /// (issue 14 item 9); another run's checkpoints are never taken for `--resume` nor pruned.
    #[test]
    fn leftovers_are_removed_and_other_runs_are_kept_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        save(out, 40, "old");
        set_folder_run_id(out, "new").unwrap();
        // What kills left: a half-removed checkpoint, a renamed one, a half-written one.
        std::fs::create_dir_all(out.join("checkpoint-1/sub")).unwrap();
        std::fs::create_dir_all(out.join(".checkpoint-2.old")).unwrap();
        std::fs::create_dir_all(out.join(".checkpoint-3.tmp")).unwrap();
        assert_eq!(
            latest_checkpoint(out),
            None,
            "took the old run's checkpoint"
        );
        let (own, foreign) = run_checkpoints(out);
        assert!(own.is_empty() && foreign.len() == 1);
        let msg = foreign_checkpoints_error(out, &foreign).to_string();
        assert!(
            msg.contains("checkpoint-40") && msg.contains("--overwrite"),
            "{msg}"
        );
        for step in [5, 6, 7] {
            save(out, step, "new");
        }
        let mut left: Vec<String> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [RUN_ID_FILE, "checkpoint-40", "checkpoint-6", "checkpoint-7"]
        );
        assert_eq!(latest_checkpoint(out), Some(out.join("checkpoint-7")));
    }
}

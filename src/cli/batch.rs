//! Options shared by `classify`, `embed` and `segment` for batch jobs over many images: an input
//! list, and the shard of this process ([`beit::tasks::shard`]).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use beit::tasks::inputs::ImageWalker;
use beit::tasks::shard::{self, ItemResult, Shard};

#[derive(Args, Debug, Clone, Default)]
pub struct BatchArgs {
    /// A text file naming one image or folder per line, taken with IMAGE|DIR (relative paths
    /// are from the current folder; `-` reads standard input).
    #[arg(long, value_name = "FILE")]
    pub input_list: Option<PathBuf>,
    /// Do shard I of --num-shards: the images at positions p with p % N == I of all the inputs
    /// sorted by path; the output gets `-0000I-of-0000N` before its extension (default:
    /// $BEIT_SHARD_INDEX, else $JOB_COMPLETION_INDEX of a Kubernetes Indexed Job, else
    /// $SLURM_ARRAY_TASK_ID less $SLURM_ARRAY_TASK_MIN; none of them: not sharded).
    #[arg(long, value_name = "I")]
    pub shard_index: Option<usize>,
    /// Number of shards (default: $BEIT_NUM_SHARDS, else $SLURM_ARRAY_TASK_COUNT).
    #[arg(long, value_name = "N")]
    pub num_shards: Option<usize>,
}

/// The inputs and shard of a run.
pub struct Batch {
    /// IMAGE|DIR and the lines of --input-list.
    pub roots: Vec<PathBuf>,
    /// The inputs an output must not replace: `roots` and the --input-list file.
    pub protected: Vec<PathBuf>,
    /// This process's shard, `None` when not sharded.
    pub shard: Option<Shard>,
}

impl BatchArgs {
    /// The run's inputs and shard (the shard said on stderr, with where it came from).
    pub fn gather(&self, inputs: &[PathBuf]) -> Result<Batch> {
        let mut roots = inputs.to_vec();
        if let Some(list) = &self.input_list {
            let listed = shard::read_input_list(list)?;
            if listed.is_empty() && roots.is_empty() {
                anyhow::bail!("{}: --input-list names no file", list.display());
            }
            roots.extend(listed);
        }
        if roots.is_empty() {
            anyhow::bail!("no inputs: give IMAGE|DIR or --input-list FILE");
        }
        let shard = Shard::from_env(self.shard_index, self.num_shards)?;
        if let Some((s, from)) = &shard {
            eprintln!("{s} (index from {from})");
        }
        let mut protected = roots.clone();
        protected.extend(self.input_list.iter().cloned());
        Ok(Batch {
            protected,
            roots,
            shard: shard.map(|s| s.0),
        })
    }
}

impl Batch {
    /// Every image of the job (all shards), walked.
    pub fn walk(&self) -> Vec<ItemResult> {
        ImageWalker::new(&self.roots).collect()
    }

    /// This shard's images, sorted by path (all images when not sharded).
    pub fn items(&self) -> Vec<ItemResult> {
        shard::select(self.walk(), self.shard)
    }

    /// The output of this shard (`output` itself when not sharded).
    pub fn output(&self, output: &Path) -> PathBuf {
        match self.shard {
            Some(s) => s.output_path(output),
            None => output.to_path_buf(),
        }
    }
}

//! Data-parallel training: replicas run the same loop on different micro-batches and average
//! their gradients before every optimiser step, behind one [`GradSync`] trait.
//!
//! * [`Single`]: one replica (the default).
//! * [`InProcessGroup`]: replicas as threads of one process (tests; CPU).
//! * `NcclSync` (cargo feature `nccl`): one process per GPU, gradients all-reduced with NCCL.

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};

use candle_core::Tensor;

use crate::error::{BeitError, Result};

/// Gradient averaging across data-parallel replicas.
pub trait GradSync: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replace every gradient by its mean over the replicas (a gradient a replica lacks counts
    /// as zero). Every replica must call this once per step, with the same names.
    fn all_reduce_mean(&self, grads: &mut HashMap<String, Tensor>) -> Result<()>;
}

/// One replica: nothing to synchronise.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl GradSync for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&self, _grads: &mut HashMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
}

struct Shared {
    world: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Option<HashMap<String, Tensor>>>>,
}

/// Replicas as threads of one process, exchanging gradients through shared memory.
#[derive(Clone)]
pub struct InProcessGroup {
    shared: Arc<Shared>,
    rank: usize,
}

impl InProcessGroup {
    /// One handle per replica (give handle `r` to the thread of rank `r`).
    pub fn new(world: usize) -> Vec<InProcessGroup> {
        let shared = Arc::new(Shared {
            world: world.max(1),
            barrier: Barrier::new(world.max(1)),
            slots: Mutex::new(vec![None; world.max(1)]),
        });
        (0..world.max(1))
            .map(|rank| InProcessGroup {
                shared: shared.clone(),
                rank,
            })
            .collect()
    }
}

impl GradSync for InProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_mean(&self, grads: &mut HashMap<String, Tensor>) -> Result<()> {
        let poisoned = || BeitError::input("data parallel", "a replica failed");
        self.shared.slots.lock().map_err(|_| poisoned())?[self.rank] = Some(grads.clone());
        self.shared.barrier.wait();
        {
            let slots = self.shared.slots.lock().map_err(|_| poisoned())?;
            let mut names: Vec<String> = slots
                .iter()
                .flatten()
                .flat_map(|m| m.keys().cloned())
                .collect();
            names.sort();
            names.dedup();
            let mut out = HashMap::with_capacity(names.len());
            for name in names {
                // Summed in rank order: every replica computes the same bits.
                let mut sum: Option<Tensor> = None;
                for g in slots.iter().flatten().filter_map(|m| m.get(&name)) {
                    sum = Some(match sum {
                        Some(s) => (s + g)?,
                        None => g.clone(),
                    });
                }
                if let Some(s) = sum {
                    out.insert(name, (s / self.shared.world as f64)?);
                }
            }
            *grads = out;
        }
        // Nobody writes the next step's gradients before everyone has read this step's.
        self.shared.barrier.wait();
        Ok(())
    }
}

#[cfg(feature = "nccl")]
pub use nccl::NcclSync;

#[cfg(feature = "nccl")]
mod nccl {
    use std::collections::HashMap;

    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
    use cudarc::nccl::safe::{Comm, Id, ReduceOp};

    use super::GradSync;
    use crate::error::{BeitError, Result};

    /// One process per GPU; gradients summed with `ncclAllReduce` and divided by the world size.
    pub struct NcclSync {
        comm: Comm,
    }

    // NCCL communicators may be used from one thread at a time; the training loop calls
    // `all_reduce_mean` from its own thread only.
    unsafe impl Send for NcclSync {}
    unsafe impl Sync for NcclSync {}

    impl NcclSync {
        /// Join the group `id` as `rank` of `world` on a CUDA `device`. Rank 0 creates the id
        /// ([`NcclSync::new_id`]) and shares its bytes with the others (e.g. through a file).
        pub fn new(
            device: &candle_core::Device,
            rank: usize,
            world: usize,
            id: Id,
        ) -> Result<Self> {
            let candle_core::Device::Cuda(dev) = device else {
                return Err(BeitError::input("device", "NCCL needs a CUDA device"));
            };
            let comm = Comm::from_rank(dev.cuda_stream(), rank, world, id)
                .map_err(|e| BeitError::input("nccl", format!("{e:?}")))?;
            Ok(Self { comm })
        }

        /// A fresh group id (rank 0), as bytes to hand to the other ranks.
        pub fn new_id() -> Result<Vec<u8>> {
            let id = Id::new().map_err(|e| BeitError::input("nccl", format!("{e:?}")))?;
            Ok(id.internal().iter().map(|&c| c as u8).collect())
        }

        /// The id from the bytes rank 0 shared.
        pub fn id_from_bytes(bytes: &[u8]) -> Result<Id> {
            if bytes.len() != 128 {
                return Err(BeitError::input(
                    "nccl id",
                    format!("expected 128 bytes, got {}", bytes.len()),
                ));
            }
            let mut internal = [0 as core::ffi::c_char; 128];
            for (d, s) in internal.iter_mut().zip(bytes) {
                *d = *s as core::ffi::c_char;
            }
            Ok(Id::uninit(internal))
        }
    }

    struct AllReduceSum<'a> {
        comm: &'a Comm,
    }

    impl CustomOp1 for AllReduceSum<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-sum"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("NCCL all-reduce runs on CUDA tensors only")
        }

        fn cuda_fwd(
            &self,
            s: &candle_core::CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
            let dev = s.device().clone();
            let src = s.as_cuda_slice::<f32>()?;
            let n = l.shape().elem_count();
            let src = match l.contiguous_offsets() {
                Some((0, len)) if len == n => src.slice(0..n),
                _ => candle_core::bail!("NCCL all-reduce needs a contiguous tensor"),
            };
            let mut dst = dev.alloc_zeros::<f32>(n)?;
            self.comm
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
            Ok((
                candle_core::CudaStorage::wrap_cuda_slice(dst, dev),
                l.shape().clone(),
            ))
        }
    }

    impl GradSync for NcclSync {
        fn rank(&self) -> usize {
            self.comm.rank()
        }
        fn world_size(&self) -> usize {
            self.comm.world_size()
        }
        fn all_reduce_mean(&self, grads: &mut HashMap<String, Tensor>) -> Result<()> {
            // The same order on every rank: NCCL matches calls by sequence.
            let mut names: Vec<String> = grads.keys().cloned().collect();
            names.sort();
            let w = self.world_size() as f64;
            for name in names {
                let g = grads[&name].to_dtype(DType::F32)?.contiguous()?;
                let summed = g.apply_op1_no_bwd(&AllReduceSum { comm: &self.comm })?;
                grads.insert(name, (summed / w)?);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn in_process_mean_is_identical_on_every_rank() {
        let groups = InProcessGroup::new(3);
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || {
                    let r = g.rank() as f32;
                    let mut grads = HashMap::new();
                    grads.insert(
                        "w".to_string(),
                        Tensor::new(&[r, 2.0 * r], &Device::Cpu).unwrap(),
                    );
                    if g.rank() == 0 {
                        grads.insert(
                            "only0".to_string(),
                            Tensor::new(&[3f32], &Device::Cpu).unwrap(),
                        );
                    }
                    g.all_reduce_mean(&mut grads).unwrap();
                    (
                        grads["w"].to_vec1::<f32>().unwrap(),
                        grads["only0"].to_vec1::<f32>().unwrap(),
                    )
                })
            })
            .collect();
        for h in handles {
            let (w, o) = h.join().unwrap();
            assert_eq!(w, vec![1.0, 2.0]);
            assert_eq!(o, vec![1.0]);
        }
    }
}

//! `util::tune_allocator`: memory a worker thread frees is reused, not handed back to the kernel
//! and faulted in again on the next step (its own test binary: the setting is process-wide).

/// Minor page faults of the calling thread so far.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn thread_page_faults() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut r) }, 0);
    r.ru_minflt
}

#[test]
fn a_worker_thread_reuses_the_memory_it_freed() {
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        eprintln!("SKIPPED: the allocator is tuned on glibc only");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        beit::util::tune_allocator();
        // A forward's pattern on one of rayon's threads: 80 MB of activations in 10 MB blocks,
        // more than one 64 MB arena heap, written and freed, step after step.
        let faults = std::thread::spawn(|| {
            let step = || {
                let blocks: Vec<Vec<u8>> = (0..8).map(|i| vec![i as u8 + 1; 10 << 20]).collect();
                std::hint::black_box(&blocks);
            };
            step();
            let before = thread_page_faults();
            for _ in 0..4 {
                step();
            }
            thread_page_faults() - before
        })
        .join()
        .unwrap();
        // Without the pad glibc deletes the arena's second heap after every step, and the
        // ~20 MB above the first heap are faulted in again: 20 484 faults in 4 steps measured.
        assert!(
            faults < 2_000,
            "{faults} page faults in 4 steps that reuse freed memory"
        );
    }
}

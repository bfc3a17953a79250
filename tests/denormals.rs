//! `util::flush_denormals` (its own process: it changes the floating-point mode of rayon's
//! threads): after it, a product that would be denormal is zero on every pool thread and on the
//! caller's, and normal numbers are untouched.

use std::hint::black_box;

#[test]
fn denormals_are_flushed_on_every_rayon_thread() {
    if !cfg!(target_arch = "x86_64") {
        eprintln!("SKIPPED: FTZ/DAZ is set on x86-64 only");
        return;
    }
    let tiny = || black_box(1e-30f32) * black_box(1e-10f32);
    assert!(tiny() > 0.0, "denormals exist before");
    beit::util::flush_denormals();
    assert_eq!(tiny(), 0.0, "caller's thread");
    let per_thread = rayon::broadcast(|_| tiny());
    assert!(per_thread.iter().all(|&v| v == 0.0), "{per_thread:?}");
    // A denormal input reads as zero (DAZ); normal arithmetic is unchanged.
    let denormal = f32::from_bits(1);
    assert_eq!(black_box(denormal) * black_box(2.0f32), 0.0);
    assert_eq!(black_box(1.5f32) * black_box(2.0f32), 3.0);
}

//! The check the attention kernels' block functions share (`f32_attention`, `bf16_attention`):
//! one block against an f64 attention of the operands as the kernel rounds them.

use super::amx_attention::Head;

/// Run `block` on shapes with partial panels, tiles and pairs (odd s, hd not a multiple of 16,
/// hd above 32), a block not starting at row 0 and consecutive blocks of one head (the cached
/// keys and values), with the bias gathered from its table, given expanded (which must give
/// the same bits) and absent; compare with f64 sums of the operands rounded by `round` (Q, K,
/// V) and `round_p` (the unnormalised probabilities), within `tol`.
pub(super) fn check_block_against_f64(
    block: &mut dyn FnMut(&Head<'_>, *mut f32, usize),
    round: fn(f32) -> f64,
    round_p: fn(f64) -> f64,
    tol: f64,
) {
    for &(s, hd, i0, r) in &[
        (1usize, 1usize, 0usize, 1usize),
        (33, 8, 0, 33),
        (197, 64, 14, 50),
        (197, 64, 64, 133),
        (71, 37, 5, 30),
        (40, 80, 0, 40),
    ] {
        let d = 2 * hd;
        let ld = 3 * d + 3;
        let qkv: Vec<f32> = (0..s * ld)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 300.0)
            .collect();
        // A bias as large as the scores, so that a wrong row or column of it shows.
        let table: Vec<f32> = (0..29).map(|i| (i * 17 % 29) as f32 * 0.25 - 3.5).collect();
        let index: Vec<u32> = (0..s * s).map(|i| ((i * 5 + i / s) % 29) as u32).collect();
        let rows = &index[i0 * s..(i0 + r) * s];
        let expanded: Vec<f32> = rows.iter().map(|&i| table[i as usize]).collect();
        let col = hd; // the second head
        let ldo = hd + 3;
        let mut gathered_out = Vec::new();
        for mode in ["gathered", "expanded", "none"] {
            let head = Head {
                qkv: &qkv,
                ld,
                col,
                d,
                hd,
                s,
                i0,
                r,
                scale: 0.3,
                table: if mode == "gathered" { &table } else { &[] },
                index: if mode == "gathered" { rows } else { &[] },
                bias: if mode == "expanded" { &expanded } else { &[] },
            };
            let mut out = vec![f32::NAN; r * ldo];
            block(&head, out.as_mut_ptr(), ldo);
            match mode {
                "gathered" => gathered_out = out.clone(),
                "expanded" => assert!(
                    out.iter()
                        .zip(&gathered_out)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "s {s} hd {hd}: the expanded bias gave other bits"
                ),
                _ => {}
            }
            for i in 0..r {
                let qi = i0 + i;
                let logits: Vec<f64> = (0..s)
                    .map(|j| {
                        let dot: f64 = (0..hd)
                            .map(|c| {
                                round(qkv[qi * ld + col + c]) * round(qkv[j * ld + col + d + c])
                            })
                            .sum();
                        let b = if mode == "none" {
                            0.0
                        } else {
                            table[index[qi * s + j] as usize] as f64
                        };
                        dot * 0.3 + b
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..hd {
                    let want: f64 = (0..s)
                        .map(|j| round_p(e[j]) * round(qkv[j * ld + col + 2 * d + c]))
                        .sum::<f64>()
                        / sum;
                    let got = out[i * ldo + c] as f64;
                    assert!(
                        (got - want).abs() < tol,
                        "{mode} s {s} hd {hd} rows {i0}+{r}: ({i},{c}) {got} vs {want}"
                    );
                }
                for c in hd..ldo {
                    assert!(out[i * ldo + c].is_nan(), "wrote past the row");
                }
            }
        }
    }
}

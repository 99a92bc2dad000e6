//! 1-bit codes of posting entries: a cheap first-pass filter in front of the
//! int8 score (the estimator of RaBitQ, Gao and Long, SIGMOD 2024).
//!
//! An entry of the posting of head `c` whose decoded int8 vector is `x` has
//! the residual `r = x - c`. Rotated by a fixed random orthogonal `P`
//! ([`Rotation`]), the signs `s = sign(P r)` are its code (`dim / 8` bytes).
//! With `L1 = sum |(P r)_i|`, the inner product of the residual with any `y`
//! is estimated by
//!
//! ```text
//!   <r, y>  ~  f * <s, P y>,      f = |r|^2 / L1
//! ```
//!
//! and the estimate's error is at most about `e * |y_perp|` with high
//! probability, where `e = |r| sqrt(1 - a^2) / (a sqrt(dim - 1))`,
//! `a = L1 / (|r| sqrt(dim))`. A query `q` is centred on the head before the
//! estimate (`y = q - c`) because the error grows with `|y|`; since the
//! estimator is linear the centring costs nothing at query time:
//!
//! ```text
//!   <q, x> = <q, c> + <r, c> + <r, q - c>
//!          ~ <q, c> + f * <s, P q> + k,     k = <r, c> - f * <s, P c>
//! ```
//!
//! So an entry stores `s` and `(f, k, e)`; a query rotates `q` once and
//! turns `P q` into per-byte lookup tables ([`QueryBits`]), so `<s, P q>`
//! costs `dim / 8` table reads. The estimate only decides which entries get
//! the int8 score: an entry whose estimate plus `kappa * e * |q - c|` stays
//! below the current rerank threshold is skipped.

use crate::distance;

/// Largest block of the block-diagonal rotation.
const BLOCK: usize = 128;

/// A random orthogonal transform: a random permutation of the coordinates
/// followed by independent random orthogonal blocks of at most [`BLOCK`]
/// coordinates. Generated from a seed with integer and f64 arithmetic only,
/// so every build and every open of an index get the same matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotation {
    dim: usize,
    perm: Vec<u32>,
    /// (offset, size) of each block.
    blocks: Vec<(usize, usize)>,
    /// Row-major block matrices, one after the other.
    mats: Vec<f32>,
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Approximately normal (sum of 12 uniforms): no transcendental functions,
    /// so the result is the same on every platform.
    fn gauss(&mut self) -> f64 {
        (0..12).map(|_| self.unit()).sum::<f64>() - 6.0
    }
}

impl Rotation {
    pub fn new(dim: usize, seed: u64) -> Rotation {
        let mut rng = SplitMix(seed ^ 0x5EED_B175_0000_0001);
        let mut perm: Vec<u32> = (0..dim as u32).collect();
        for i in (1..dim).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            perm.swap(i, j);
        }
        let nb = dim.div_ceil(BLOCK).max(1);
        let mut blocks = Vec::with_capacity(nb);
        let mut mats = Vec::new();
        let mut off = 0;
        for b in 0..nb {
            let size = (dim - off) / (nb - b);
            blocks.push((off, size));
            // modified Gram-Schmidt on a Gaussian matrix, in f64
            let mut m: Vec<f64> = (0..size * size).map(|_| rng.gauss()).collect();
            for i in 0..size {
                for j in 0..i {
                    let d: f64 = (0..size).map(|t| m[i * size + t] * m[j * size + t]).sum();
                    for t in 0..size {
                        m[i * size + t] -= d * m[j * size + t];
                    }
                }
                let n = (0..size)
                    .map(|t| m[i * size + t] * m[i * size + t])
                    .sum::<f64>()
                    .sqrt();
                for t in 0..size {
                    m[i * size + t] /= n;
                }
            }
            mats.extend(m.iter().map(|&x| x as f32));
            off += size;
        }
        Rotation {
            dim,
            perm,
            blocks,
            mats,
        }
    }

    /// `out = P x`.
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        let mut px = vec![0f32; self.dim];
        for (i, &p) in self.perm.iter().enumerate() {
            px[i] = x[p as usize];
        }
        let mut m = 0;
        for &(off, size) in &self.blocks {
            let src = &px[off..off + size];
            for i in 0..size {
                out[off + i] = distance::dot(&self.mats[m + i * size..m + (i + 1) * size], src);
            }
            m += size * size;
        }
    }
}

/// Bytes of one entry's sign code.
pub fn code_bytes(dim: usize) -> usize {
    dim.div_ceil(8)
}

/// Sign code and factors `(f, k, e)` of the residual `x - c` (see the module
/// docs); `rot_c` is `P c`.
pub fn encode(rot: &Rotation, x: &[f32], c: &[f32], rot_c: &[f32], bits: &mut [u8]) -> [f32; 3] {
    let dim = x.len();
    let r: Vec<f32> = x.iter().zip(c).map(|(a, b)| a - b).collect();
    let mut u = vec![0f32; dim];
    rot.apply(&r, &mut u);
    bits.fill(0);
    let (mut l1, mut n2, mut sc) = (0f64, 0f64, 0f64);
    for i in 0..dim {
        let pos = u[i] > 0.0;
        if pos {
            bits[i / 8] |= 1 << (i % 8);
        }
        l1 += u[i].abs() as f64;
        n2 += (u[i] as f64) * (u[i] as f64);
        sc += if pos {
            rot_c[i] as f64
        } else {
            -(rot_c[i] as f64)
        };
    }
    if l1 <= 0.0 || n2 <= 0.0 {
        // the entry is the head: its residual is exactly zero
        return [0.0, distance::dot(&r, c), 0.0];
    }
    let f = n2 / l1;
    let rc: f64 = r.iter().zip(c).map(|(a, b)| *a as f64 * *b as f64).sum();
    let k = rc - f * sc;
    let norm = n2.sqrt();
    let a = (l1 / (norm * (dim as f64).sqrt())).min(1.0);
    let e = norm * (1.0 - a * a).max(0.0).sqrt() / (a * ((dim.max(2) - 1) as f64).sqrt());
    [f as f32, k as f32, e as f32]
}

/// A query rotated and cut into per-byte lookup tables: `dot_signs(s)`
/// returns `<s, P q>` for a sign code `s`.
pub struct QueryBits {
    tables: Vec<i16>,
    sum: i32,
    step: f32,
}

impl QueryBits {
    pub fn new(rot: &Rotation, q: &[f32]) -> QueryBits {
        let dim = q.len();
        let mut pq = vec![0f32; dim];
        rot.apply(q, &mut pq);
        // 8 values of at most 4095 per table entry fit an i16
        let amax = pq.iter().fold(0f32, |m, x| m.max(x.abs()));
        let step = if amax > 0.0 { amax / 4095.0 } else { 1.0 };
        let qq: Vec<i32> = pq.iter().map(|x| (x / step).round() as i32).collect();
        let nb = code_bytes(dim);
        let mut tables = vec![0i16; nb * 256];
        for j in 0..nb {
            let t = &mut tables[j * 256..(j + 1) * 256];
            for b in 1..256usize {
                let low = b.trailing_zeros() as usize;
                let d = j * 8 + low;
                let v = if d < dim { qq[d] } else { 0 };
                t[b] = t[b & (b - 1)] + v as i16;
            }
        }
        QueryBits {
            tables,
            sum: qq.iter().sum(),
            step,
        }
    }

    /// `<s, P q>` for the sign code `bits` (bit set: +1, clear: -1).
    #[inline]
    pub fn dot_signs(&self, bits: &[u8]) -> f32 {
        let t = &self.tables;
        let mut acc = [0i32; 4];
        let mut ch = bits.chunks_exact(4);
        let mut j = 0;
        for c in &mut ch {
            // SAFETY-free indexing: j * 256 + byte < tables.len() since
            // bits.len() == tables.len() / 256
            acc[0] += t[j * 256 + c[0] as usize] as i32;
            acc[1] += t[(j + 1) * 256 + c[1] as usize] as i32;
            acc[2] += t[(j + 2) * 256 + c[2] as usize] as i32;
            acc[3] += t[(j + 3) * 256 + c[3] as usize] as i32;
            j += 4;
        }
        for &b in ch.remainder() {
            acc[0] += t[j * 256 + b as usize] as i32;
            j += 1;
        }
        let s = acc[0] + acc[1] + acc[2] + acc[3];
        (2 * s - self.sum) as f32 * self.step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vecs(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix(seed);
        (0..n * dim).map(|_| r.gauss() as f32).collect()
    }

    #[test]
    fn rotation_is_orthogonal_and_deterministic() {
        for dim in [1, 7, 64, 130, 384] {
            let rot = Rotation::new(dim, 5);
            assert_eq!(rot, Rotation::new(dim, 5));
            let x = vecs(2, dim, 9);
            let (a, b) = x.split_at(dim);
            let (mut pa, mut pb) = (vec![0f32; dim], vec![0f32; dim]);
            rot.apply(a, &mut pa);
            rot.apply(b, &mut pb);
            let want = distance::dot(a, b);
            let got = distance::dot(&pa, &pb);
            assert!(
                (want - got).abs() < 1e-3 * dim as f32,
                "{dim}: {want} {got}"
            );
            let n = distance::dot(a, a);
            assert!((distance::dot(&pa, &pa) - n).abs() < 1e-4 * n.max(1.0) * dim as f32);
        }
    }

    #[test]
    fn estimates_stay_within_their_error_bound() {
        let dim = 384;
        let rot = Rotation::new(dim, 1);
        let data = vecs(300, dim, 2);
        let c = vecs(1, dim, 3);
        let mut rc = vec![0f32; dim];
        rot.apply(&c, &mut rc);
        let q = vecs(1, dim, 4);
        let qb = QueryBits::new(&rot, &q);
        let yperp = distance::l2_squared(&q, &c).sqrt();
        let mut bits = vec![0u8; code_bytes(dim)];
        let mut over = 0;
        for x in data.chunks_exact(dim) {
            let [f, k, e] = encode(&rot, x, &c, &rc, &mut bits);
            let est = distance::dot(&q, &c) + f * qb.dot_signs(&bits) + k;
            let exact = distance::dot(&q, x);
            if (est - exact).abs() > 2.0 * e * yperp {
                over += 1;
            }
            assert!(
                (est - exact).abs() < 4.0 * e * yperp + 1e-3,
                "{est} {exact} {e}"
            );
        }
        assert!(over < 15, "{over} of 300 outside 2 error bounds");
    }

    #[test]
    fn sign_tables_match_a_direct_sum() {
        for dim in [5, 8, 13, 384] {
            let rot = Rotation::new(dim, 7);
            let q = vecs(1, dim, 8);
            let qb = QueryBits::new(&rot, &q);
            let mut pq = vec![0f32; dim];
            rot.apply(&q, &mut pq);
            let mut r = SplitMix(11);
            let bits: Vec<u8> = (0..code_bytes(dim)).map(|_| r.next() as u8).collect();
            let want: f32 = (0..dim)
                .map(|i| {
                    if bits[i / 8] >> (i % 8) & 1 == 1 {
                        pq[i]
                    } else {
                        -pq[i]
                    }
                })
                .sum();
            let amax = pq.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!((qb.dot_signs(&bits) - want).abs() < amax * 1e-3 * dim as f32);
        }
    }
}

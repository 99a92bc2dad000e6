//! 1-bit codes of posting entries: a cheap first-pass filter in front of the
//! int8 score (the estimator of RaBitQ, Gao and Long, SIGMOD 2024).
//!
//! An entry of the posting of head `c` whose decoded int8 vector is `x` has
//! the residual `r = x - c`. Rotated by a fixed random orthogonal `P`
//! ([`Rotation`], a randomised Hadamard transform), the signs `s = sign(P r)` are its code (`dim / 8` bytes).
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
//! quantizes `P q` to 6-bit bit planes ([`QueryBits`]), so `<s, P q>`
//! costs 7 popcounts per 64 coordinates. The estimate only decides which entries get
//! the int8 score: an entry whose estimate plus `kappa * e * |q - c|` stays
//! below the current rerank threshold is skipped.

use crate::rng::Rng;

/// Rounds of the rotation (each: random signs, then a Walsh-Hadamard
/// transform of one window).
const ROUNDS: usize = 4;

/// A random orthogonal transform that needs no matrix: [`ROUNDS`] rounds of
/// random sign flips followed by a normalised fast Walsh-Hadamard transform
/// of the largest power-of-two window, alternately the first and the last
/// `2^m` coordinates (so when `dim` is not a power of two the windows overlap
/// and every coordinate is mixed). About `4 * dim * log2(dim)` additions per
/// vector and `ROUNDS * dim` bytes of state; f32 additions only, in a fixed
/// order, so every build and every open compute the same codes.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotation {
    dim: usize,
    /// Window length (a power of two, at most `dim`).
    win: usize,
    /// `ROUNDS x dim` random signs (+1 or -1).
    flips: Vec<f32>,
}

/// In-place normalised Walsh-Hadamard transform of `x` (length a power of 2).
fn fwht(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for blk in x.chunks_exact_mut(2 * h) {
            let (a, b) = blk.split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (s, d) = (*u + *v, *u - *v);
                *u = s;
                *v = d;
            }
        }
        h *= 2;
    }
    let norm = 1.0 / (n as f32).sqrt();
    for v in x.iter_mut() {
        *v *= norm;
    }
}

impl Rotation {
    pub fn new(dim: usize, seed: u64) -> Rotation {
        let mut rng = Rng::from_state(seed ^ 0x5EED_B175_0000_0001);
        let win = if dim == 0 {
            0
        } else {
            1usize << (usize::BITS - 1 - dim.leading_zeros())
        };
        let flips = (0..ROUNDS * dim)
            .map(|_| if rng.next_u64() >> 63 == 1 { -1.0 } else { 1.0 })
            .collect();
        Rotation { dim, win, flips }
    }

    /// `out = P x`.
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        let dim = self.dim;
        out[..dim].copy_from_slice(&x[..dim]);
        if dim == 0 {
            return;
        }
        for r in 0..ROUNDS {
            for (v, &f) in out.iter_mut().zip(&self.flips[r * dim..(r + 1) * dim]) {
                *v *= f;
            }
            if r % 2 == 0 {
                fwht(&mut out[..self.win]);
            } else {
                fwht(&mut out[dim - self.win..dim]);
            }
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
        let rc: f64 = r.iter().zip(c).map(|(a, b)| *a as f64 * *b as f64).sum();
        return [0.0, rc as f32, 0.0];
    }
    let f = n2 / l1;
    let rc: f64 = r.iter().zip(c).map(|(a, b)| *a as f64 * *b as f64).sum();
    let k = rc - f * sc;
    let norm = n2.sqrt();
    let a = (l1 / (norm * (dim as f64).sqrt())).min(1.0);
    let e = norm * (1.0 - a * a).max(0.0).sqrt() / (a * ((dim.max(2) - 1) as f64).sqrt());
    [f as f32, k as f32, e as f32]
}

/// Bits per coordinate of the rotated query in [`QueryBits`].
const QUERY_BITS: usize = 4;

/// A query rotated and quantized to [`QUERY_BITS`]-bit unsigned integers,
/// stored as bit planes: `<s, P q>` for a sign code `s` is then a few
/// AND + popcount operations per 64 coordinates.
pub struct QueryBits {
    /// `planes[w * QUERY_BITS + j]`: bit `j` of the quantized coordinates
    /// `64 w .. 64 w + 63`.
    planes: Vec<u64>,
    lo: f32,
    step: f32,
    /// Sum of the dequantized coordinates.
    sum: f32,
}

impl QueryBits {
    pub fn new(rot: &Rotation, q: &[f32]) -> QueryBits {
        let dim = q.len();
        let mut pq = vec![0f32; dim];
        rot.apply(q, &mut pq);
        let lo = pq.iter().fold(f32::INFINITY, |m, &x| m.min(x));
        let hi = pq.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let levels = ((1u32 << QUERY_BITS) - 1) as f32;
        let (lo, step) = if dim > 0 && hi > lo {
            (lo, (hi - lo) / levels)
        } else {
            (if dim > 0 { lo } else { 0.0 }, 1.0)
        };
        let words = code_bytes(dim).div_ceil(8);
        let mut planes = vec![0u64; QUERY_BITS * words];
        let mut qsum = 0u64;
        for (i, &x) in pq.iter().enumerate() {
            // x >= lo, so truncating after + 0.5 rounds (and is a single
            // instruction, where `round` is a libm call on baseline x86-64)
            let u = ((x - lo) / step + 0.5).min(levels) as u64;
            qsum += u;
            let pl = &mut planes[(i / 64) * QUERY_BITS..(i / 64 + 1) * QUERY_BITS];
            for (j, p) in pl.iter_mut().enumerate() {
                *p |= (u >> j & 1) << (i % 64);
            }
        }
        QueryBits {
            planes,
            lo,
            step,
            sum: dim as f32 * lo + step * qsum as f32,
        }
    }

    /// `<s, P q>` for the sign code `bits` (bit set: +1, clear: -1; the
    /// bits past `dim` must be clear, as [`encode`] leaves them).
    #[inline]
    pub fn dot_signs(&self, bits: &[u8]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("popcnt") {
                // SAFETY: the CPU has popcnt (checked just above)
                return unsafe { self.dot_signs_popcnt(bits) };
            }
        }
        self.dot_signs_any(bits)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "popcnt")]
    unsafe fn dot_signs_popcnt(&self, bits: &[u8]) -> f32 {
        self.dot_signs_any(bits)
    }

    /// `out[i] = <s_i, P q>` for the consecutive sign codes `codes`
    /// (`nb` bytes each, `out.len()` of them): one call per posting.
    pub fn dot_signs_all(&self, codes: &[u8], nb: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if (1..=64).contains(&nb)
                && self.planes.len() == QUERY_BITS * nb.div_ceil(8)
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vpopcntdq")
            {
                // SAFETY: the CPU has these features (checked just above)
                unsafe { self.dot_signs_all_avx512(codes, nb, out) };
                return;
            }
            if std::is_x86_feature_detected!("popcnt") {
                // SAFETY: the CPU has popcnt (checked just above)
                unsafe { self.dot_signs_all_popcnt(codes, nb, out) };
                return;
            }
        }
        for (o, c) in out.iter_mut().zip(codes.chunks_exact(nb.max(1))) {
            *o = self.dot_signs_any(c);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "popcnt")]
    unsafe fn dot_signs_all_popcnt(&self, codes: &[u8], nb: usize, out: &mut [f32]) {
        for (o, c) in out.iter_mut().zip(codes.chunks_exact(nb.max(1))) {
            *o = self.dot_signs_any(c);
        }
    }

    /// [`QueryBits::dot_signs_all`] with one code (up to 512 bits) per
    /// 512-bit register: the same integer counts as the scalar path, so the
    /// same results to the bit.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vpopcntdq,avx2")]
    unsafe fn dot_signs_all_avx512(&self, codes: &[u8], nb: usize, out: &mut [f32]) {
        use std::arch::x86_64::*;
        const _: () = assert!(QUERY_BITS == 4, "the kernel holds four planes");
        let words = nb.div_ceil(8);
        // plane j of every word, one word per 64-bit lane
        let mut pl = [[0u64; 8]; QUERY_BITS];
        for w in 0..words {
            for (j, p) in pl.iter_mut().enumerate() {
                p[w] = self.planes[w * QUERY_BITS + j];
            }
        }
        let p0 = _mm512_loadu_si512(pl[0].as_ptr() as *const _);
        let p1 = _mm512_loadu_si512(pl[1].as_ptr() as *const _);
        let p2 = _mm512_loadu_si512(pl[2].as_ptr() as *const _);
        let p3 = _mm512_loadu_si512(pl[3].as_ptr() as *const _);
        let mask: __mmask64 = if nb == 64 { !0 } else { (1u64 << nb) - 1 };
        let n = out.len().min(codes.len() / nb);
        let base = codes.as_ptr();
        // one code's lanes: popcount of the code in the low half, the
        // plane-weighted popcounts in the high half (each under 2^32)
        let lanes = |i: usize| {
            // SAFETY: bytes i*nb .. i*nb + nb are inside `codes` (i < n);
            // the masked load reads no others
            let b = _mm512_maskz_loadu_epi8(mask, base.add(i * nb) as *const i8);
            let ones = _mm512_popcnt_epi64(b);
            let u = _mm512_add_epi64(
                _mm512_add_epi64(
                    _mm512_popcnt_epi64(_mm512_and_si512(b, p0)),
                    _mm512_slli_epi64::<1>(_mm512_popcnt_epi64(_mm512_and_si512(b, p1))),
                ),
                _mm512_add_epi64(
                    _mm512_slli_epi64::<2>(_mm512_popcnt_epi64(_mm512_and_si512(b, p2))),
                    _mm512_slli_epi64::<3>(_mm512_popcnt_epi64(_mm512_and_si512(b, p3))),
                ),
            );
            _mm512_add_epi64(ones, _mm512_slli_epi64::<32>(u))
        };
        // eight codes at a time: their lanes summed by a transpose (lane t of
        // the result is code t's sum), then the float formula on all eight
        // (the same operations, in the same order, as the one-code path)
        let (lo8, step8, sum8) = (
            _mm256_set1_ps(self.lo),
            _mm256_set1_ps(self.step),
            _mm256_set1_ps(self.sum),
        );
        let two8 = _mm256_set1_ps(2.0);
        let mut i = 0;
        while i + 8 <= n {
            let pair = |a: __m512i, b: __m512i| {
                _mm512_add_epi64(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b))
            };
            let a0 = pair(lanes(i), lanes(i + 1));
            let a1 = pair(lanes(i + 2), lanes(i + 3));
            let a2 = pair(lanes(i + 4), lanes(i + 5));
            let a3 = pair(lanes(i + 6), lanes(i + 7));
            let half = |a: __m512i, b: __m512i| {
                _mm512_add_epi64(
                    _mm512_shuffle_i64x2::<0b10_00_10_00>(a, b),
                    _mm512_shuffle_i64x2::<0b11_01_11_01>(a, b),
                )
            };
            let c = half(half(a0, a1), half(a2, a3));
            let ones = _mm256_cvtepi32_ps(_mm512_cvtepi64_epi32(c));
            let u = _mm256_cvtepi32_ps(_mm512_cvtepi64_epi32(_mm512_srli_epi64::<32>(c)));
            let v = _mm256_sub_ps(
                _mm256_mul_ps(
                    two8,
                    _mm256_add_ps(_mm256_mul_ps(lo8, ones), _mm256_mul_ps(step8, u)),
                ),
                sum8,
            );
            // SAFETY: i + 8 <= n <= out.len()
            _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
            i += 8;
        }
        for (i, o) in out.iter_mut().enumerate().take(n).skip(i) {
            // ones < 2^10 and u < 2^14 per code: one reduction for both
            let both = _mm512_reduce_add_epi64(lanes(i));
            let ones = (both & 0xFFFF_FFFF) as u32;
            let u = (both >> 32) as u32;
            *o = 2.0 * (self.lo * ones as f32 + self.step * u as f32) - self.sum;
        }
    }

    #[inline(always)]
    fn dot_signs_any(&self, bits: &[u8]) -> f32 {
        let mut ones = 0u32;
        let mut acc = [0u32; QUERY_BITS];
        let mut add = |b: u64, pl: &[u64]| {
            ones += b.count_ones();
            for j in 0..QUERY_BITS {
                acc[j] += (b & pl[j]).count_ones();
            }
        };
        let mut planes = self.planes.chunks_exact(QUERY_BITS);
        let mut ch = bits.chunks_exact(8);
        for (c, pl) in (&mut ch).zip(&mut planes) {
            add(u64::from_le_bytes(c.try_into().unwrap()), pl);
        }
        let rest = ch.remainder();
        if !rest.is_empty() {
            if let Some(pl) = planes.next() {
                let mut b = [0u8; 8];
                b[..rest.len()].copy_from_slice(rest);
                add(u64::from_le_bytes(b), pl);
            }
        }
        let mut u = 0u32;
        for (j, a) in acc.iter().enumerate() {
            u += a << j;
        }
        // sum over set bits of (lo + step * u_i), twice, minus the total
        2.0 * (self.lo * ones as f32 + self.step * u as f32) - self.sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distance;

    fn vecs(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        // sums of 12 uniforms: close enough to Gaussian for these tests
        let mut r = Rng::from_state(seed);
        (0..n * dim)
            .map(|_| ((0..12).map(|_| r.next_f64()).sum::<f64>() - 6.0) as f32)
            .collect()
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
            let mut r = Rng::from_state(11);
            let mut bits: Vec<u8> = (0..code_bytes(dim)).map(|_| r.next_u64() as u8).collect();
            // codes keep the bits past `dim` clear (see `encode`)
            if dim % 8 != 0 {
                *bits.last_mut().unwrap() &= (1u8 << (dim % 8)) - 1;
            }
            let want: f32 = (0..dim)
                .map(|i| {
                    if bits[i / 8] >> (i % 8) & 1 == 1 {
                        pq[i]
                    } else {
                        -pq[i]
                    }
                })
                .sum();
            // each coordinate is off by at most half a quantization step
            let lo = pq.iter().fold(f32::INFINITY, |m, &x| m.min(x));
            let hi = pq.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let step = (hi - lo) / ((1 << QUERY_BITS) - 1) as f32;
            let got = qb.dot_signs(&bits);
            assert!(
                (got - want).abs() <= 0.5 * step * dim as f32 + 1e-4,
                "{dim}: {got} {want}"
            );
        }
    }

    #[test]
    fn all_codes_at_once_match_one_at_a_time() {
        // the batch path (AVX-512 where the CPU has it) gives the same
        // floats as the one-code path, for dims up to and past 512 bits
        for dim in [1, 7, 64, 100, 384, 512, 520, 768] {
            let rot = Rotation::new(dim, 3);
            let q = vecs(1, dim, 4);
            let qb = QueryBits::new(&rot, &q);
            let nb = code_bytes(dim);
            let n = 37;
            let mut r = Rng::from_state(dim as u64);
            let mut codes: Vec<u8> = (0..n * nb).map(|_| r.next_u64() as u8).collect();
            if dim % 8 != 0 {
                for c in codes.chunks_exact_mut(nb) {
                    *c.last_mut().unwrap() &= (1u8 << (dim % 8)) - 1;
                }
            }
            let mut got = vec![0f32; n];
            qb.dot_signs_all(&codes, nb, &mut got);
            for (i, c) in codes.chunks_exact(nb).enumerate() {
                assert_eq!(got[i].to_bits(), qb.dot_signs(c).to_bits(), "{dim} {i}");
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    #[test]
    #[ignore]
    fn dot_signs_speed() {
        let dim = 384;
        let rot = Rotation::new(dim, 1);
        let q: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let qb = QueryBits::new(&rot, &q);
        let codes: Vec<u8> = (0..48 * 4096)
            .map(|i| ((i * 2654435761usize) >> 7) as u8)
            .collect();
        let t = std::time::Instant::now();
        let mut s = 0f32;
        for _ in 0..200 {
            for c in codes.chunks_exact(48) {
                s += qb.dot_signs(c);
            }
        }
        eprintln!(
            "{:.1} ns per code ({s})",
            t.elapsed().as_nanos() as f64 / (200.0 * 4096.0)
        );
        let t = std::time::Instant::now();
        for _ in 0..1000 {
            s += QueryBits::new(&rot, &q).sum;
        }
        eprintln!(
            "{:.1} us per QueryBits::new ({s})",
            t.elapsed().as_micros() as f64 / 1000.0
        );
    }
}

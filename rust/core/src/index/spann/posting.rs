//! Posting contents: the int8 scalar quantizer that turns a vector into a
//! posting entry, and the kernel that scores a float query against codes.
//!
//! Each dimension `d` has its own range `[lo_d, lo_d + 255 * scale_d]`; a
//! value is coded as `round((x - lo_d) / scale_d) - 128`. A query `q` is
//! prepared once ([`QueryCodes`]) so an entry's approximate inner product is
//! `base + sum_d (q_d * scale_d) * code_d`, one int8-by-float dot product.

use crate::distance::Metric;
pub use crate::storage::posting::PostingData;
use std::sync::OnceLock;

/// Per-dimension affine int8 quantizer.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantizer {
    pub lo: Vec<f32>,
    pub scale: Vec<f32>,
}

impl Quantizer {
    /// Fit the ranges to the min and max of each dimension of `data`.
    pub fn fit(data: &[f32], dim: usize) -> Quantizer {
        let mut lo = vec![f32::INFINITY; dim];
        let mut hi = vec![f32::NEG_INFINITY; dim];
        for v in data.chunks_exact(dim) {
            for d in 0..dim {
                lo[d] = lo[d].min(v[d]);
                hi[d] = hi[d].max(v[d]);
            }
        }
        let mut scale = vec![0f32; dim];
        for d in 0..dim {
            if !lo[d].is_finite() {
                lo[d] = -1.0;
                hi[d] = 1.0;
            }
            // a little head-room for vectors added later
            let pad = (hi[d] - lo[d]) * 0.02 + 1e-6;
            lo[d] -= pad;
            scale[d] = (hi[d] + pad - lo[d]) / 255.0;
        }
        Quantizer { lo, scale }
    }

    pub fn dim(&self) -> usize {
        self.lo.len()
    }

    /// Code `v` into `out`; returns the squared norm of the decoded vector.
    pub fn encode(&self, v: &[f32], out: &mut [i8]) -> f32 {
        let mut n2 = 0f32;
        for d in 0..v.len() {
            let c = ((v[d] - self.lo[d]) / self.scale[d])
                .round()
                .clamp(0.0, 255.0);
            out[d] = (c as i32 - 128) as i8;
            let x = self.lo[d] + self.scale[d] * c;
            n2 += x * x;
        }
        n2
    }

    pub fn decode(&self, code: &[i8], out: &mut [f32]) {
        for d in 0..code.len() {
            out[d] = self.lo[d] + self.scale[d] * (code[d] as f32 + 128.0);
        }
    }
}

/// A query prepared for scoring against codes. The per-dimension products
/// `q_d * scale_d` are themselves rounded to i16 (`q16 * qscale`), so an
/// entry costs one i16-by-i8 integer dot product (AVX2 `vpmaddwd`); with 15
/// bits for the query the rounding is far below the codes' own error, and
/// the final candidates are reranked at full precision anyway.
pub struct QueryCodes {
    q16: Vec<i16>,
    qscale: f32,
    base: f32,
    qnorm: f32,
    metric: Metric,
}

impl QueryCodes {
    pub fn new(q: &[f32], quant: &Quantizer, metric: Metric) -> Self {
        let mut qs = vec![0f32; q.len()];
        let mut base = 0f32;
        for d in 0..q.len() {
            qs[d] = q[d] * quant.scale[d];
            base += q[d] * (quant.lo[d] + 128.0 * quant.scale[d]);
        }
        // keep 128 * dim * max|q16| below 2^31 so the i32 sum cannot overflow
        let limit = (i32::MAX as f32 / (128.0 * q.len().max(1) as f32)).min(32767.0);
        let amax = qs.iter().fold(0f32, |m, x| m.max(x.abs()));
        let qscale = if amax > 0.0 { amax / limit } else { 1.0 };
        let q16 = qs.iter().map(|x| (x / qscale).round() as i16).collect();
        QueryCodes {
            q16,
            qscale,
            base,
            qnorm: crate::distance::dot(q, q),
            metric,
        }
    }

    /// Approximate similarity (higher is closer) of entry `i` of `p`.
    #[inline]
    pub fn score(&self, p: &PostingData, i: usize) -> f32 {
        let dim = self.q16.len();
        self.score_code(&p.codes[i * dim..(i + 1) * dim], p.aux[i])
    }

    /// Approximate similarity of one code whose decoded squared norm is `aux`.
    #[inline]
    pub fn score_code(&self, code: &[i8], aux: f32) -> f32 {
        let ip = self.base + self.qscale * dot_i16_i8(&self.q16, code) as f32;
        match self.metric {
            Metric::L2 => -(self.qnorm - 2.0 * ip + aux),
            _ => ip,
        }
    }

    /// Approximate inner product of the query with one code.
    #[inline]
    pub fn ip_code(&self, code: &[i8]) -> f32 {
        self.base + self.qscale * dot_i16_i8(&self.q16, code) as f32
    }

    /// [`QueryCodes::dist_code`] from the code's inner product
    /// ([`QueryCodes::ip_code`]).
    #[inline]
    pub fn dist_of_ip(&self, ip: f32, aux: f32) -> f32 {
        match self.metric {
            Metric::Cosine => 1.0 - ip,
            _ => self.qnorm - 2.0 * ip + aux,
        }
    }

    /// Squared norm of the query.
    pub fn qnorm(&self) -> f32 {
        self.qnorm
    }

    /// Approximate head distance (see `SpannIndex::dist`) of one code:
    /// 1 - similarity for cosine, squared L2 otherwise.
    #[inline]
    pub fn dist_code(&self, code: &[i8], aux: f32) -> f32 {
        let ip = self.base + self.qscale * dot_i16_i8(&self.q16, code) as f32;
        match self.metric {
            Metric::Cosine => 1.0 - ip,
            _ => self.qnorm - 2.0 * ip + aux,
        }
    }
}

type Kernel = fn(&[f32], &[i8]) -> f32;

fn kernel() -> Kernel {
    static K: OnceLock<Kernel> = OnceLock::new();
    *K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return x86::dot_i8_avx2;
            }
        }
        dot_i8_portable
    })
}

/// Dot product of a float vector with int8 codes (same length).
#[inline]
pub fn dot_i8(a: &[f32], b: &[i8]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    (kernel())(a, b)
}

type IntKernel = fn(&[i16], &[i8]) -> i32;

fn int_kernel() -> IntKernel {
    static K: OnceLock<IntKernel> = OnceLock::new();
    *K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                return x86::dot_i16_i8_avx2;
            }
        }
        dot_i16_i8_portable
    })
}

/// Integer dot product of i16 query components with int8 codes.
#[inline]
pub fn dot_i16_i8(a: &[i16], b: &[i8]) -> i32 {
    debug_assert_eq!(a.len(), b.len());
    (int_kernel())(a, b)
}

pub fn dot_i16_i8_portable(a: &[i16], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let mut acc = [0i32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += a[c * 8 + i] as i32 * b[c * 8 + i] as i32;
        }
    }
    let mut s: i32 = acc.iter().sum();
    for i in chunks * 8..n {
        s += a[i] as i32 * b[i] as i32;
    }
    s
}

pub fn dot_i8_portable(a: &[f32], b: &[i8]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += a[c * 8 + i] * b[c * 8 + i] as f32;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..n {
        s += a[i] * b[i] as f32;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    pub fn dot_i8_avx2(a: &[f32], b: &[i8]) -> f32 {
        // SAFETY: installed only after detecting avx2 and fma.
        unsafe { imp(a, b) }
    }

    pub fn dot_i16_i8_avx2(a: &[i16], b: &[i8]) -> i32 {
        // SAFETY: installed only after detecting avx2.
        unsafe { imp16(a, b) }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn imp16(a: &[i16], b: &[i8]) -> i32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_si256();
        let mut acc1 = _mm256_setzero_si256();
        let mut i = 0;
        while i + 32 <= n {
            let c0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pb.add(i) as *const __m128i));
            let c1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pb.add(i + 16) as *const __m128i));
            let q0 = _mm256_loadu_si256(pa.add(i) as *const __m256i);
            let q1 = _mm256_loadu_si256(pa.add(i + 16) as *const __m256i);
            acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(q0, c0));
            acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(q1, c1));
            i += 32;
        }
        while i + 16 <= n {
            let c0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pb.add(i) as *const __m128i));
            let q0 = _mm256_loadu_si256(pa.add(i) as *const __m256i);
            acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(q0, c0));
            i += 16;
        }
        let s = _mm256_add_epi32(acc0, acc1);
        let h = _mm_add_epi32(_mm256_extracti128_si256(s, 1), _mm256_castsi256_si128(s));
        let h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0b01_00_11_10));
        let h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0b10_11_00_01));
        let mut total = _mm_cvtsi128_si32(h);
        while i < n {
            total += *pa.add(i) as i32 * *pb.add(i) as i32;
            i += 1;
        }
        total
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn imp(a: &[f32], b: &[i8]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let c = _mm_loadu_si128(pb.add(i) as *const __m128i);
            let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
            let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8)));
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), lo, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), hi, acc1);
            i += 16;
        }
        let s = _mm256_add_ps(acc0, acc1);
        let h = _mm_add_ps(_mm256_extractf128_ps(s, 1), _mm256_castps256_ps128(s));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        let mut total = _mm_cvtss_f32(h);
        while i < n {
            total += *pa.add(i) * *pb.add(i) as f32;
            i += 1;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8_kernel_matches_naive() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<i8> = (0..n).map(|i| ((i * 53) % 256) as u8 as i8).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * *y as f32).sum();
            assert!((dot_i8(&a, &b) - want).abs() < 1e-3, "n={n}");
            assert!((dot_i8_portable(&a, &b) - want).abs() < 1e-3);
        }
    }

    #[test]
    fn i16_kernel_matches_naive() {
        for n in 0..100 {
            let a: Vec<i16> = (0..n).map(|i| ((i * 7919) % 65536) as u16 as i16).collect();
            let b: Vec<i8> = (0..n).map(|i| ((i * 53) % 256) as u8 as i8).collect();
            let want: i64 = a.iter().zip(&b).map(|(x, y)| *x as i64 * *y as i64).sum();
            assert_eq!(dot_i16_i8(&a, &b) as i64, want, "n={n}");
            assert_eq!(dot_i16_i8_portable(&a, &b) as i64, want);
        }
    }

    #[test]
    fn quantized_scores_track_exact_ones() {
        let dim = 32;
        let data: Vec<f32> = (0..dim * 50)
            .map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5)
            .collect();
        let q = Quantizer::fit(&data, dim);
        let mut p = PostingData::default();
        let mut code = vec![0i8; dim];
        for v in data.chunks_exact(dim) {
            let aux = q.encode(v, &mut code);
            p.push(0, 0, aux, &code, &[], [0.0; 3]);
        }
        let query = &data[3 * dim..4 * dim];
        for metric in [Metric::Ip, Metric::L2] {
            let qc = QueryCodes::new(query, &q, metric);
            for (i, v) in data.chunks_exact(dim).enumerate() {
                let exact = metric.similarity(query, v);
                assert!((qc.score(&p, i) - exact).abs() < 0.02, "{metric:?} {i}");
            }
        }
    }
}

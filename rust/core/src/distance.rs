//! Metrics and distance kernels.
//!
//! Every index in engramdb ranks by a *similarity*: higher is closer. For
//! [`Metric::Cosine`] vectors are unit-normalised on the way in and the
//! similarity is their dot product; for [`Metric::Ip`] it is the raw dot
//! product; for [`Metric::L2`] it is the negated squared Euclidean distance.
//! [`Metric::user_score`] converts a similarity into what the public API
//! reports (for L2: the squared distance itself, lower is closer).
//!
//! The kernels pick an AVX2+FMA implementation at run time when the CPU has
//! it and fall back to portable code (which the compiler auto-vectorises for
//! the baseline target) otherwise.

use crate::error::{Error, Result};
use std::sync::OnceLock;

/// How vectors are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Cosine similarity (vectors normalised on insert and query).
    Cosine,
    /// Squared Euclidean distance.
    L2,
    /// Inner product.
    Ip,
}

impl Metric {
    pub fn parse(s: &str) -> Result<Metric> {
        match s.to_ascii_lowercase().as_str() {
            "cosine" | "cos" => Ok(Metric::Cosine),
            "l2" | "euclidean" => Ok(Metric::L2),
            "ip" | "dot" | "inner_product" => Ok(Metric::Ip),
            other => Err(Error::InvalidArgument(format!(
                "unknown metric {other:?}: expected one of cosine, l2, ip"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::L2 => "l2",
            Metric::Ip => "ip",
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Metric::Cosine => 0,
            Metric::L2 => 1,
            Metric::Ip => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<Metric> {
        match c {
            0 => Some(Metric::Cosine),
            1 => Some(Metric::L2),
            2 => Some(Metric::Ip),
            _ => None,
        }
    }

    /// Similarity of two already-prepared vectors (higher is closer).
    #[inline]
    pub fn similarity(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            Metric::Cosine | Metric::Ip => dot(a, b),
            Metric::L2 => -l2_squared(a, b),
        }
    }

    /// The score the public API reports for an internal similarity.
    #[inline]
    pub fn user_score(self, similarity: f32) -> f32 {
        match self {
            Metric::L2 => -similarity,
            _ => similarity,
        }
    }

    /// Whether vectors are normalised before storage and search.
    pub fn normalizes(self) -> bool {
        self == Metric::Cosine
    }
}

/// Check that every value is finite; report the first offender.
pub fn check_finite(values: &[f32], dim: usize) -> Result<()> {
    if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidValue(format!(
            "vector {} component {} is {}",
            pos / dim.max(1),
            pos % dim.max(1),
            values[pos]
        )));
    }
    Ok(())
}

/// Normalise `v` to unit length in place. A zero vector is rejected because
/// it has no direction to compare by cosine.
pub fn normalize(v: &mut [f32]) -> Result<()> {
    let n = dot(v, v).sqrt();
    if n == 0.0 || !n.is_finite() {
        return Err(Error::InvalidValue(
            "a zero vector has no cosine similarity; use metric 'ip' or 'l2' to store it".into(),
        ));
    }
    let inv = 1.0 / n;
    v.iter_mut().for_each(|x| *x *= inv);
    Ok(())
}

type Kernel = fn(&[f32], &[f32]) -> f32;
type RowsKernel = fn(&[f32], &[f32], &mut [f32]);

struct Kernels {
    dot: Kernel,
    l2: Kernel,
    dot_rows: RowsKernel,
    name: &'static str,
}

fn kernels() -> &'static Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Kernels {
                    dot: x86::dot_avx2,
                    l2: x86::l2_avx2,
                    dot_rows: x86::dot_rows_avx2,
                    name: "avx2+fma",
                };
            }
        }
        Kernels {
            dot: dot_portable,
            l2: l2_portable,
            dot_rows: dot_rows_portable,
            name: "portable",
        }
    })
}

/// Which kernel family this CPU uses ("avx2+fma" or "portable").
pub fn kernel_name() -> &'static str {
    kernels().name
}

/// Dot product. Panics in debug builds if lengths differ.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    (kernels().dot)(a, b)
}

/// Squared Euclidean distance.
#[inline]
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    (kernels().l2)(a, b)
}

/// Dot products of one query with consecutive rows: `out[i] = q . rows[i]`,
/// where `rows` holds `out.len()` rows of `q.len()` floats. Streaming several
/// rows per pass keeps the query in registers and the loads independent,
/// which is what a memory-bound single-query scan needs.
#[inline]
pub fn dot_rows(q: &[f32], rows: &[f32], out: &mut [f32]) {
    debug_assert_eq!(rows.len(), q.len() * out.len());
    (kernels().dot_rows)(q, rows, out)
}

pub fn dot_rows_portable(q: &[f32], rows: &[f32], out: &mut [f32]) {
    let d = q.len();
    for (o, r) in out.iter_mut().zip(rows.chunks_exact(d)) {
        *o = dot_portable(q, r);
    }
}

/// Portable dot product with eight independent accumulators so the compiler
/// can vectorise it without reassociating a single sum.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..n {
        s += a[i] * b[i];
    }
    s
}

/// Portable squared L2 distance.
pub fn l2_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for i in 0..8 {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..n {
        let d = a[i] - b[i];
        s += d * d;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    pub fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only installed by `kernels()` after detecting avx2 and fma.
        unsafe { dot_impl(a, b) }
    }

    pub fn l2_avx2(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: as above.
        unsafe { l2_impl(a, b) }
    }

    pub fn dot_rows_avx2(q: &[f32], rows: &[f32], out: &mut [f32]) {
        // SAFETY: as above; bounds are checked before any load.
        unsafe { dot_rows_impl(q, rows, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_rows_impl(q: &[f32], rows: &[f32], out: &mut [f32]) {
        const R: usize = 8;
        let d = q.len();
        let n = out.len();
        assert!(rows.len() >= n * d);
        let d8 = d / 8 * 8;
        let pq = q.as_ptr();
        let mut r = 0;
        while r + R <= n {
            let p0 = rows.as_ptr().add(r * d);
            let mut a = [_mm256_setzero_ps(); R];
            let mut i = 0;
            while i < d8 {
                let x = _mm256_loadu_ps(pq.add(i));
                for (j, acc) in a.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(p0.add(j * d + i)), *acc);
                }
                i += 8;
            }
            for (j, acc) in a.iter().enumerate() {
                let mut s = hsum(*acc);
                let pj = p0.add(j * d);
                for t in d8..d {
                    s += *pq.add(t) * *pj.add(t);
                }
                out[r + j] = s;
            }
            r += R;
        }
        while r < n {
            out[r] = dot_impl(q, &rows[r * d..(r + 1) * d]);
            r += 1;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_impl(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(pa.add(i + 8 * j));
                let y = _mm256_loadu_ps(pb.add(i + 8 * j));
                *acc_j = _mm256_fmadd_ps(x, y, *acc_j);
            }
            i += 32;
        }
        while i + 8 <= n {
            let x = _mm256_loadu_ps(pa.add(i));
            let y = _mm256_loadu_ps(pb.add(i));
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum(s);
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn l2_impl(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let d = _mm256_sub_ps(
                    _mm256_loadu_ps(pa.add(i + 8 * j)),
                    _mm256_loadu_ps(pb.add(i + 8 * j)),
                );
                *acc_j = _mm256_fmadd_ps(d, d, *acc_j);
            }
            i += 32;
        }
        while i + 8 <= n {
            let d = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
            acc[0] = _mm256_fmadd_ps(d, d, acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum(s);
        while i < n {
            let d = *pa.add(i) - *pb.add(i);
            total += d * d;
            i += 1;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn kernels_match_naive_at_every_length() {
        let mut g = crate::testdata::Lcg::new(7);
        for n in 0..100 {
            let a: Vec<f32> = (0..n).map(|_| g.next_f32()).collect();
            let b: Vec<f32> = (0..n).map(|_| g.next_f32()).collect();
            let want = naive_dot(&a, &b);
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-4, "dot n={n}");
            assert!((dot_portable(&a, &b) as f64 - want).abs() < 1e-4);
            let want_l2: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum();
            assert!(
                (l2_squared(&a, &b) as f64 - want_l2).abs() < 1e-4,
                "l2 n={n}"
            );
            assert!((l2_portable(&a, &b) as f64 - want_l2).abs() < 1e-4);
        }
    }

    #[test]
    fn dot_rows_matches_dot() {
        let mut g = crate::testdata::Lcg::new(3);
        for d in [1, 7, 8, 33, 384] {
            for n in [0, 1, 3, 4, 9] {
                let q: Vec<f32> = (0..d).map(|_| g.next_f32()).collect();
                let rows: Vec<f32> = (0..n * d).map(|_| g.next_f32()).collect();
                let mut out = vec![0.0; n];
                dot_rows(&q, &rows, &mut out);
                let mut port = vec![0.0; n];
                dot_rows_portable(&q, &rows, &mut port);
                for i in 0..n {
                    let want = naive_dot(&q, &rows[i * d..(i + 1) * d]);
                    assert!((out[i] as f64 - want).abs() < 1e-3, "d={d} n={n} i={i}");
                    assert!((port[i] as f64 - want).abs() < 1e-3);
                }
            }
        }
    }

    #[test]
    fn metric_names_round_trip() {
        for m in [Metric::Cosine, Metric::L2, Metric::Ip] {
            assert_eq!(Metric::parse(m.name()).unwrap(), m);
            assert_eq!(Metric::from_code(m.code()), Some(m));
        }
        assert!(Metric::parse("hamming").is_err());
    }

    #[test]
    fn normalize_rejects_zero() {
        let mut z = vec![0.0; 4];
        assert!(normalize(&mut z).is_err());
        let mut v = vec![3.0, 4.0];
        normalize(&mut v).unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn check_finite_names_the_offender() {
        let e = check_finite(&[1.0, 2.0, f32::NAN, 0.0], 2).unwrap_err();
        assert!(e.to_string().contains("vector 1 component 0"), "{e}");
    }
}

//! Deterministic pseudo-random vectors for tests, benches and fuzz seeds: one generator instead of a
//! copy per test file. Not for anything a user stores: the numbers only need to be reproducible.

/// A 64-bit linear congruential generator (Knuth's MMIX constants).
#[derive(Clone, Debug)]
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed)
    }

    /// The next raw state.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }

    /// The next value, uniform in `[-0.5, 0.5)` (24 random bits).
    pub fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }
}

/// `n` vectors of `dim` values, each uniform in `[-0.5, 0.5)`.
pub fn uniform(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut g = Lcg::new(seed);
    (0..n * dim).map(|_| g.next_f32()).collect()
}

/// `n` vectors around `centers` random centres (uniform in `[-0.5, 0.5)`), each centre picked at
/// random, plus uniform noise of width `spread` per component: clustered like real embeddings.
pub fn clustered(n: usize, dim: usize, centers: usize, spread: f32, seed: u64) -> Vec<f32> {
    let mut g = Lcg::new(seed);
    let cs: Vec<f32> = (0..centers * dim).map(|_| g.next_f32()).collect();
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let c = ((g.next_f32() + 0.5) * centers as f32) as usize % centers;
        out.extend((0..dim).map(|d| cs[c * dim + d] + spread * g.next_f32()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_in_range() {
        assert_eq!(uniform(10, 4, 3), uniform(10, 4, 3));
        assert_ne!(uniform(10, 4, 3), uniform(10, 4, 4));
        assert!(uniform(1000, 8, 1).iter().all(|v| (-0.5..0.5).contains(v)));
        let c = clustered(300, 8, 5, 0.1, 2);
        assert_eq!(c.len(), 300 * 8);
        // every vector lies within the noise of one of the 5 centres
        let cs = &uniform(5, 8, 2)[..];
        for v in c.chunks(8) {
            assert!(cs
                .chunks(8)
                .any(|m| v.iter().zip(m).all(|(a, b)| (a - b).abs() <= 0.05 + 1e-6)));
        }
    }
}

//! The forgetting curve (MemoryBank, Zhong et al. 2023).
//!
//! Retention `R = exp(-dt / S)`: `dt` is the time since the memory was last
//! recalled, in units of [`DecayPolicy::unit_seconds`] (a day by default),
//! and `S` is its strength. Each recall reinforces: `S += increment` and the
//! clock restarts (`dt = 0`). A stronger memory fades more slowly: note the
//! parentheses, `dt / S` (MemoryBank's own code computes `exp(-t/5*S)`, which
//! makes strong memories fade *faster*).
//!
//! Ranking with decay mixes three parts, as in Generative Agents:
//! `score = w_sim * similarity + w_ret * retention + w_imp * importance`
//! with retention and importance in [0, 1] and the default weights
//! [`Weights::default`] = (1.0, 0.3, 0.2).

use super::record::Record;
use crate::storage::wal::Touch;

/// How memories fade and how recalls reinforce them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecayPolicy {
    /// Seconds in one unit of `dt` (86400: strength is measured in days).
    pub unit_seconds: f64,
    /// Added to the strength on each recall (MemoryBank adds 1).
    pub increment: f32,
    /// Whether a recall restarts the clock (MemoryBank: yes).
    pub reset_on_recall: bool,
}

impl Default for DecayPolicy {
    fn default() -> Self {
        DecayPolicy {
            unit_seconds: 86_400.0,
            increment: 1.0,
            reset_on_recall: true,
        }
    }
}

impl DecayPolicy {
    /// Retention of `r` at time `now` (seconds since the epoch), in (0, 1].
    pub fn retention(&self, r: &Record, now: f64) -> f32 {
        let dt = ((now - r.last_access).max(0.0) / self.unit_seconds) as f32;
        let s = r.strength.max(f32::MIN_POSITIVE);
        (-dt / s).exp()
    }

    /// The access record of recalling `r` at `now`.
    pub fn reinforce(&self, r: &Record, now: f64) -> Touch {
        Touch {
            id: r.id,
            last_access: if self.reset_on_recall {
                now.max(r.last_access)
            } else {
                r.last_access
            },
            strength: r.strength + self.increment,
            access_count: r.access_count + 1,
        }
    }
}

/// Weights of the three parts of a decayed score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    pub similarity: f32,
    pub retention: f32,
    pub importance: f32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            similarity: 1.0,
            retention: 0.3,
            importance: 0.2,
        }
    }
}

impl Weights {
    pub fn score(&self, similarity: f32, retention: f32, importance: f32) -> f32 {
        self.similarity * similarity + self.retention * retention + self.importance * importance
    }

    /// The most retention and importance can add to a score.
    pub fn max_bonus(&self) -> f32 {
        self.retention.max(0.0) + self.importance.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_falls_with_time_and_rises_with_strength() {
        let p = DecayPolicy::default();
        let mut r = Record::new(1, 0.0);
        assert_eq!(p.retention(&r, 0.0), 1.0);
        let day = 86_400.0;
        let r1 = p.retention(&r, day);
        let r2 = p.retention(&r, 2.0 * day);
        assert!(r1 > r2 && (r1 - (-1.0f32).exp()).abs() < 1e-6);
        r.strength = 5.0;
        assert!(
            p.retention(&r, day) > r1,
            "a stronger memory fades more slowly"
        );
        assert!((p.retention(&r, 5.0 * day) - (-1.0f32).exp()).abs() < 1e-6);
    }

    #[test]
    fn reinforcement_adds_strength_and_resets_the_clock() {
        let p = DecayPolicy::default();
        let r = Record::new(1, 0.0);
        let t = p.reinforce(&r, 100.0);
        assert_eq!((t.strength, t.last_access, t.access_count), (2.0, 100.0, 1));
    }
}

//! A record: everything the store keeps about one id besides its vector.
//!
//! The memory attributes (importance, strength, access times, links, scope)
//! live here from format version 1.0 on, so the forgetting curve and memory
//! links are stored without a format change.

use crate::storage::codec::{Dec, DecodeError, Enc};
use serde_json::Value;

/// Who a record belongs to. A search in one scope never returns another's
/// record: scopes are a hard partition, not a ranking hint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Scope {
    pub user_id: Option<String>,
    pub agent_id: Option<String>,
    pub session_id: Option<String>,
}

impl Scope {
    /// Whether a record of scope `self` is visible to a query restricted to
    /// `want`: every field the query sets must be equal.
    pub fn visible_to(&self, want: &Scope) -> bool {
        fn ok(have: &Option<String>, want: &Option<String>) -> bool {
            want.is_none() || have == want
        }
        ok(&self.user_id, &want.user_id)
            && ok(&self.agent_id, &want.agent_id)
            && ok(&self.session_id, &want.session_id)
    }

    pub fn is_empty(&self) -> bool {
        self.user_id.is_none() && self.agent_id.is_none() && self.session_id.is_none()
    }
}

/// A typed, weighted edge to another record.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub target: u64,
    pub kind: String,
    pub weight: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub id: u64,
    pub text: Option<String>,
    /// A JSON object, or `None`.
    pub metadata: Option<Value>,
    pub scope: Scope,
    pub importance: f32,
    /// MemoryBank's strength S in R = exp(-dt / S).
    pub strength: f32,
    /// Seconds since the Unix epoch.
    pub created_at: f64,
    pub updated_at: f64,
    pub last_access: f64,
    pub access_count: u64,
    pub archived: bool,
    pub links: Vec<Link>,
}

impl Record {
    pub fn new(id: u64, now: f64) -> Self {
        Record {
            id,
            text: None,
            metadata: None,
            scope: Scope::default(),
            importance: 0.5,
            strength: 1.0,
            created_at: now,
            updated_at: now,
            last_access: now,
            access_count: 0,
            archived: false,
            links: Vec::new(),
        }
    }

    pub fn encode(&self, e: &mut Enc) {
        e.u64(self.id);
        e.opt_str(self.text.as_deref());
        let meta = self.metadata.as_ref().map(|m| m.to_string());
        e.opt_str(meta.as_deref());
        e.opt_str(self.scope.user_id.as_deref());
        e.opt_str(self.scope.agent_id.as_deref());
        e.opt_str(self.scope.session_id.as_deref());
        e.f32(self.importance);
        e.f32(self.strength);
        e.f64(self.created_at);
        e.f64(self.updated_at);
        e.f64(self.last_access);
        e.u64(self.access_count);
        e.u8(self.archived as u8);
        e.u32(self.links.len() as u32);
        for l in &self.links {
            e.u64(l.target);
            e.str(&l.kind);
            e.f32(l.weight);
        }
    }

    pub fn decode(d: &mut Dec) -> Result<Record, DecodeError> {
        let id = d.u64()?;
        let text = d.opt_str()?;
        let metadata = match d.opt_str()? {
            None => None,
            Some(s) => Some(
                serde_json::from_str(&s)
                    .map_err(|e| DecodeError(format!("metadata of id {id} is not JSON: {e}")))?,
            ),
        };
        let scope = Scope {
            user_id: d.opt_str()?,
            agent_id: d.opt_str()?,
            session_id: d.opt_str()?,
        };
        let importance = d.f32()?;
        let strength = d.f32()?;
        let created_at = d.f64()?;
        let updated_at = d.f64()?;
        let last_access = d.f64()?;
        let access_count = d.u64()?;
        let flags = d.u8()?;
        if flags > 1 {
            return Err(DecodeError(format!(
                "record {id}: unknown flags {flags:#x}"
            )));
        }
        let nlinks = d.len_prefix(12)?;
        let mut links = Vec::with_capacity(nlinks);
        for _ in 0..nlinks {
            links.push(Link {
                target: d.u64()?,
                kind: d.str()?,
                weight: d.f32()?,
            });
        }
        Ok(Record {
            id,
            text,
            metadata,
            scope,
            importance,
            strength,
            created_at,
            updated_at,
            last_access,
            access_count,
            archived: flags & 1 == 1,
            links,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let mut r = Record::new(42, 1.5e9);
        r.text = Some("héllo".into());
        r.metadata = Some(serde_json::json!({"a": [1, 2], "b": {"c": null}}));
        r.scope.user_id = Some("mel".into());
        r.links.push(Link {
            target: 7,
            kind: "similar".into(),
            weight: 0.8,
        });
        r.archived = true;
        let mut e = Enc::default();
        r.encode(&mut e);
        let bytes = e.into_inner();
        let back = Record::decode(&mut Dec::new(&bytes)).unwrap();
        assert_eq!(back, r);
        // every strict prefix fails to decode instead of panicking
        for cut in 0..bytes.len() {
            assert!(Record::decode(&mut Dec::new(&bytes[..cut])).is_err());
        }
    }

    #[test]
    fn scope_visibility() {
        let s = Scope {
            user_id: Some("a".into()),
            agent_id: None,
            session_id: Some("s".into()),
        };
        assert!(s.visible_to(&Scope::default()));
        assert!(s.visible_to(&Scope {
            user_id: Some("a".into()),
            ..Default::default()
        }));
        assert!(!s.visible_to(&Scope {
            user_id: Some("b".into()),
            ..Default::default()
        }));
        assert!(!s.visible_to(&Scope {
            agent_id: Some("x".into()),
            ..Default::default()
        }));
    }
}

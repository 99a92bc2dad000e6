//! The memory graph (A-MEM's links, Zettelkasten-style): typed, weighted,
//! always stored in both directions, with a degree cap that evicts the
//! weakest link (on both of its ends) when a record would exceed it.

use super::record::{Link, Record};
use std::collections::HashMap;

/// Default most links one record keeps.
pub const DEFAULT_MAX_DEGREE: usize = 16;

fn upsert_link(r: &mut Record, target: u64, kind: &str, weight: f32) {
    match r.links.iter_mut().find(|l| l.target == target) {
        Some(l) => {
            l.kind = kind.to_string();
            l.weight = weight;
        }
        None => r.links.push(Link {
            target,
            kind: kind.to_string(),
            weight,
        }),
    }
}

/// The records changed by linking `a` and `b` (both must be in `records`):
/// copies of `a`, `b` and of any record whose link was evicted by the cap.
pub fn link_pair(
    records: &HashMap<u64, Record>,
    a: u64,
    b: u64,
    kind: &str,
    weight: f32,
    max_degree: usize,
) -> Vec<Record> {
    let mut changed: HashMap<u64, Record> = HashMap::new();
    let get = |changed: &mut HashMap<u64, Record>, id: u64| -> Option<()> {
        if let std::collections::hash_map::Entry::Vacant(e) = changed.entry(id) {
            e.insert(records.get(&id)?.clone());
        }
        Some(())
    };
    if get(&mut changed, a).is_none() || get(&mut changed, b).is_none() {
        return Vec::new();
    }
    upsert_link(changed.get_mut(&a).unwrap(), b, kind, weight);
    upsert_link(changed.get_mut(&b).unwrap(), a, kind, weight);
    for end in [a, b] {
        loop {
            let r = &changed[&end];
            if r.links.len() <= max_degree.max(1) {
                break;
            }
            // evict the weakest link other than the one just made
            let new = if end == a { b } else { a };
            let Some(victim) = r
                .links
                .iter()
                .filter(|l| l.target != new)
                .min_by(|x, y| x.weight.total_cmp(&y.weight).then(y.target.cmp(&x.target)))
                .map(|l| l.target)
            else {
                break;
            };
            changed
                .get_mut(&end)
                .unwrap()
                .links
                .retain(|l| l.target != victim);
            if get(&mut changed, victim).is_some() {
                changed
                    .get_mut(&victim)
                    .unwrap()
                    .links
                    .retain(|l| l.target != end);
            }
        }
    }
    let mut out: Vec<Record> = changed.into_values().collect();
    out.sort_by_key(|r| r.id);
    out
}

/// The records changed by removing the link between `a` and `b`.
pub fn unlink_pair(records: &HashMap<u64, Record>, a: u64, b: u64) -> Vec<Record> {
    let mut out = Vec::new();
    for (x, y) in [(a, b), (b, a)] {
        if let Some(r) = records.get(&x) {
            if r.links.iter().any(|l| l.target == y) {
                let mut r = r.clone();
                r.links.retain(|l| l.target != y);
                out.push(r);
            }
        }
    }
    out
}

/// Make every link symmetric and drop links to missing records. Run after
/// replay: a crash between the two halves of a batch can leave one side.
pub fn repair(records: &mut HashMap<u64, Record>) -> usize {
    let mut missing: Vec<(u64, Link)> = Vec::new();
    let mut dangling = 0;
    for r in records.values() {
        for l in &r.links {
            match records.get(&l.target) {
                None => dangling += 1,
                Some(t) if !t.links.iter().any(|x| x.target == r.id) => missing.push((
                    l.target,
                    Link {
                        target: r.id,
                        kind: l.kind.clone(),
                        weight: l.weight,
                    },
                )),
                _ => {}
            }
        }
    }
    if dangling > 0 {
        let ids: std::collections::HashSet<u64> = records.keys().copied().collect();
        for r in records.values_mut() {
            r.links.retain(|l| ids.contains(&l.target));
        }
    }
    let fixed = missing.len() + dangling;
    for (id, link) in missing {
        if let Some(r) = records.get_mut(&id) {
            if !r.links.iter().any(|x| x.target == link.target) {
                r.links.push(link);
            }
        }
    }
    fixed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(n: u64) -> HashMap<u64, Record> {
        (0..n).map(|i| (i, Record::new(i, 0.0))).collect()
    }

    fn apply(records: &mut HashMap<u64, Record>, changed: Vec<Record>) {
        for r in changed {
            records.insert(r.id, r);
        }
    }

    fn symmetric(records: &HashMap<u64, Record>) -> bool {
        records.values().all(|r| {
            r.links.iter().all(|l| {
                records[&l.target]
                    .links
                    .iter()
                    .any(|x| x.target == r.id && x.weight == l.weight)
            })
        })
    }

    #[test]
    fn links_are_symmetric_and_capped() {
        let mut r = recs(10);
        for i in 1..10 {
            let c = link_pair(&r, 0, i, "similar", i as f32 / 10.0, 3);
            apply(&mut r, c);
            assert!(symmetric(&r));
        }
        let kept: Vec<u64> = r[&0].links.iter().map(|l| l.target).collect();
        assert_eq!(kept.len(), 3);
        assert!(
            kept.contains(&9) && kept.contains(&8) && kept.contains(&7),
            "{kept:?}"
        );
        let c = unlink_pair(&r, 0, 9);
        apply(&mut r, c);
        assert!(symmetric(&r) && r[&9].links.is_empty());
    }

    #[test]
    fn repair_restores_symmetry() {
        let mut r = recs(3);
        r.get_mut(&0).unwrap().links.push(Link {
            target: 1,
            kind: "x".into(),
            weight: 0.5,
        });
        r.get_mut(&0).unwrap().links.push(Link {
            target: 77,
            kind: "x".into(),
            weight: 0.5,
        });
        assert_eq!(repair(&mut r), 2);
        assert!(symmetric(&r));
    }
}

//! Where each value dies: after the op of its own region that uses it last. A use inside an
//! op's regions counts as a use by that op; a use by an op fused into a group counts where the
//! group runs, at its root. The interpreter drops a tile there and hands its memory to the next
//! tile of its size, so a long straight-line kernel keeps only its live tiles, warm in cache.

use std::collections::{HashMap, HashSet};

use crate::interpret::fused::{Plan, Role};
use crate::ir::{Func, Op, Region, ValueId};

/// For each region (by its address, stable while the function is borrowed), for each of its
/// ops: the values that die after it.
pub(crate) struct Liveness {
    deaths: HashMap<usize, Vec<Vec<ValueId>>>,
}

fn address(region: &Region) -> usize {
    region as *const Region as usize
}

impl Liveness {
    pub fn of(func: &Func, plan: &Plan) -> Liveness {
        // Each fused op's value, mapped to its group's root (the value computed where it runs).
        let mut root_of = HashMap::new();
        for group in &plan.groups {
            let Some(root) = group.nodes.last().and_then(|n| n.op.results.first()) else { continue };
            for node in &group.nodes {
                if let Some(&v) = node.op.results.first() {
                    root_of.insert(v, *root);
                }
            }
        }
        let kept: HashSet<ValueId> = func.results.iter().copied().collect();
        let mut liveness = Liveness { deaths: HashMap::new() };
        liveness.region(&func.body, &func.args, plan, &root_of, &kept);
        liveness
    }

    /// The values that die after each op of `region`, by the op's position.
    pub fn deaths(&self, region: &Region) -> Option<&[Vec<ValueId>]> {
        self.deaths.get(&address(region)).map(Vec::as_slice)
    }

    fn region(&mut self, region: &Region, outer_args: &[ValueId], plan: &Plan, root_of: &HashMap<ValueId, ValueId>, kept: &HashSet<ValueId>) {
        let position: HashMap<ValueId, usize> = region.ops.iter().enumerate().flat_map(|(i, op)| op.results.iter().map(move |&r| (r, i))).collect();
        // Where an op runs: a fused op at its group's root.
        let runs_at = |i: usize, op: &Op| op.results.first().and_then(|r| root_of.get(r)).and_then(|root| position.get(root)).copied().unwrap_or(i);
        // Each value defined here, at its definition until a later use moves it.
        let mut last = position.clone();
        for v in outer_args.iter().chain(&region.args) {
            last.insert(*v, 0);
        }
        for (i, op) in region.ops.iter().enumerate() {
            let at = runs_at(i, op);
            let mut note = |v: ValueId| {
                if let Some(l) = last.get_mut(&v) {
                    *l = (*l).max(at);
                }
            };
            op.operands().into_iter().for_each(&mut note);
            for sub in op.regions() {
                sub.walk(&mut |inner| inner.operands().into_iter().for_each(&mut note));
            }
        }
        let mut deaths = vec![Vec::new(); region.ops.len()];
        for (v, at) in last {
            let fused = matches!(plan.roles.get(v.index()), Some(Role::Absorbed));
            if !kept.contains(&v) && !fused {
                if let Some(d) = deaths.get_mut(at) {
                    d.push(v);
                }
            }
        }
        self.deaths.insert(address(region), deaths);
        for op in &region.ops {
            for sub in op.regions() {
                self.region(sub, &[], plan, root_of, kept);
            }
        }
    }
}

//! The tree's shape, computed from the worker count N and the fan-out F
//! before anything starts (plain data, like the streaming schedule).
//!
//! Positions: 0 is the store (the root); 1..=inner are the broadcast-reduce
//! nodes, numbered from the top level down; then the N workers, numbered
//! by worker index. The store has exactly one child: the top node, or the
//! only worker when N = 1 (the tree with no inner node). Every inner node
//! has between 2 and F children, except a tree of N = 1. Siblings are
//! ordered; that order is the order in which a node sums its children's
//! gradients, so it is part of the result's bits.
//!
//! Groups on each level are as even as possible (sizes differ by at most
//! one), so the depth is ceil(log_F N) inner levels.

/// The fan-outs the fabric supports (issue: 4 by default, 2 also).
pub const FANOUT_MIN: usize = 2;
pub const FANOUT_MAX: usize = 16;
/// A limit on the tree, checked at start-up.
pub const WORKERS_MAX: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Store,
    Node,
    Worker(usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub role: Role,
    /// `None` for the store.
    pub parent: Option<usize>,
    /// Ordered: the summation order of this node's reduce.
    pub children: Vec<usize>,
    /// Hops from the store.
    pub depth: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    pub workers: usize,
    pub fanout: usize,
    pub positions: Vec<Position>,
}

impl Tree {
    pub fn new(workers: usize, fanout: usize) -> Result<Tree, String> {
        if !(1..=WORKERS_MAX).contains(&workers) {
            return Err(format!("fabric.workers = {workers} is outside 1..={WORKERS_MAX}"));
        }
        if !(FANOUT_MIN..=FANOUT_MAX).contains(&fanout) {
            return Err(format!("fabric.fanout = {fanout} is outside {FANOUT_MIN}..={FANOUT_MAX}"));
        }
        // Build bottom-up: each level groups the items below it as evenly
        // as possible; a group of one passes its item up unchanged, so no
        // node has a single child.
        #[derive(Clone, Copy)]
        enum Item {
            Worker(usize),
            Node(usize),
        }
        let mut built: Vec<Vec<Item>> = Vec::new(); // children of each node, in build order
        let mut items: Vec<Item> = (0..workers).map(Item::Worker).collect();
        while items.len() > 1 {
            let groups = items.len().div_ceil(fanout);
            let (base, extra) = (items.len() / groups, items.len() % groups);
            let mut it = items.into_iter();
            items = (0..groups)
                .map(|g| {
                    let group: Vec<Item> = it.by_ref().take(base + usize::from(g < extra)).collect();
                    if group.len() == 1 {
                        group[0]
                    } else {
                        built.push(group);
                        Item::Node(built.len() - 1)
                    }
                })
                .collect();
        }
        // Number the nodes breadth-first from the top, so parents come first.
        let inner = built.len();
        let total = 1 + inner + workers;
        let mut positions: Vec<Position> =
            (0..total).map(|_| Position { role: Role::Node, parent: None, children: Vec::new(), depth: 0 }).collect();
        positions[0].role = Role::Store;
        for w in 0..workers {
            positions[1 + inner + w].role = Role::Worker(w);
        }
        let mut queue = std::collections::VecDeque::from([(items[0], 0usize)]);
        let mut next_id = 1;
        while let Some((item, parent)) = queue.pop_front() {
            let id = match item {
                Item::Worker(w) => 1 + inner + w,
                Item::Node(_) => {
                    next_id += 1;
                    next_id - 1
                }
            };
            positions[id].parent = Some(parent);
            positions[parent].children.push(id);
            if let Item::Node(k) = item {
                queue.extend(built[k].iter().map(|&c| (c, id)));
            }
        }
        assert_eq!(next_id, 1 + inner, "every node numbered once");
        // Depths, top-down (parents have smaller ids than their children).
        for id in 1..total {
            let p = positions[id].parent.expect("every position but the store has a parent");
            assert!(p < id, "parents are numbered before their children");
            positions[id].depth = positions[p].depth + 1;
        }
        Ok(Tree { workers, fanout, positions })
    }

    /// Broadcast-reduce nodes in the tree.
    pub fn inner_nodes(&self) -> usize {
        self.positions.len() - 1 - self.workers
    }

    /// The position of worker `w`.
    pub fn worker_position(&self, w: usize) -> usize {
        assert!(w < self.workers);
        1 + self.inner_nodes() + w
    }

    /// Hops from the store to the deepest worker.
    pub fn depth(&self) -> usize {
        self.positions.iter().map(|p| p.depth).max().unwrap_or(0)
    }

    /// The positions of the inner nodes, top first.
    pub fn nodes(&self) -> std::ops::RangeInclusive<usize> {
        1..=self.inner_nodes()
    }

    /// The workers under position `id`, in worker order.
    pub fn workers_under(&self, id: usize) -> Vec<usize> {
        match self.positions[id].role {
            Role::Worker(w) => vec![w],
            _ => self.positions[id].children.iter().flat_map(|&c| self.workers_under(c)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_is_the_tree_with_no_inner_node() {
        let t = Tree::new(1, 4).unwrap();
        assert_eq!(t.positions.len(), 2);
        assert_eq!(t.positions[0].children, vec![1]);
        assert_eq!(t.positions[1].role, Role::Worker(0));
        assert_eq!(t.depth(), 1);
    }

    #[test]
    fn every_worker_is_reached_once_with_at_most_fanout_children_and_log_depth() {
        for fanout in [2, 3, 4, 8] {
            for workers in 1..=200 {
                let t = Tree::new(workers, fanout).unwrap();
                assert_eq!(t.workers_under(0), (0..workers).collect::<Vec<_>>(), "N={workers} F={fanout}");
                for (id, p) in t.positions.iter().enumerate() {
                    match p.role {
                        Role::Store => assert_eq!(p.children.len(), 1),
                        Role::Node => {
                            assert!((2..=fanout).contains(&p.children.len()), "node {id}: N={workers} F={fanout}")
                        }
                        Role::Worker(_) => assert!(p.children.is_empty()),
                    }
                    for &c in &p.children {
                        assert_eq!(t.positions[c].parent, Some(id));
                    }
                }
                // ceil(log_F N) inner levels, plus the hop from the store.
                let mut levels = 0;
                let mut reach = 1;
                while reach < workers {
                    reach *= fanout;
                    levels += 1;
                }
                assert_eq!(t.depth(), levels + 1, "N={workers} F={fanout}");
            }
        }
    }

    #[test]
    fn seven_workers_at_fanout_two_group_evenly() {
        let t = Tree::new(7, 2).unwrap();
        // Level 1 groups 2,2,2 and passes worker 6 up; level 2 pairs those
        // four items; the top node pairs the two.
        assert_eq!(t.inner_nodes(), 6);
        assert!(t.nodes().all(|id| t.positions[id].children.len() == 2));
        assert_eq!(t.positions[t.worker_position(0)].depth, 4);
        assert_eq!(t.positions[t.worker_position(6)].depth, 3);
    }

    #[test]
    fn bad_shapes_are_refused_with_the_key() {
        assert!(Tree::new(0, 4).unwrap_err().contains("fabric.workers"));
        assert!(Tree::new(4, 1).unwrap_err().contains("fabric.fanout"));
    }
}

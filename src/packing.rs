//! How the sequences of a batch sit in its token rows, for the ops that care (RoPE
//! positions, attention).
//!
//! Plain packing: sequence s occupies rows `offsets[s]..offsets[s+1]`, positions
//! restart at 0 per sequence.
//!
//! Shared prefixes: several sequences that begin with the same tokens (a DPO pair's
//! prompt, or several completions of one prompt) form a group whose rows are
//! `[prefix | branch 1 | branch 2 | …]`. The prefix is stored and computed once; each
//! branch's positions continue from the prefix's end. Under causal attention a prefix
//! token never sees anything after it, so its activations are the same in every
//! sequence of the group and computing it once changes nothing but float summation
//! order. Attention is the one op that must see each branch as its own sequence
//! `[prefix | branch]`: `Prefixes` maps the packed rows to that "expanded" layout and
//! back (ops::attention does the mapping, with gathers and scatters).
//! The idea is Wang & Hegde, "Accelerating Direct Preference Optimization with Prefix
//! Sharing" (arXiv 2410.20305); they mask inside attention instead, which needs no
//! expanded copy but a kernel change.

/// Token rows of a batch. With shared prefixes `offsets` delimit the groups (prefix and
/// all its branches); see the module comment.
#[derive(Clone, Debug)]
pub struct Packing {
    pub offsets: Vec<usize>,
    prefixes: Option<Box<Prefixes>>,
    /// The device copy of the layout, made by the first device attention of the batch
    /// and reused by every layer, forward and backward.
    pub(crate) dev: crate::backend::cuda::tensor_ops::LayoutCache,
}

/// The expanded layout of a packing with shared prefixes: every branch is the plain
/// sequence `[prefix | branch]`, so a prefix row has one copy per branch.
#[derive(Clone, Debug)]
pub struct Prefixes {
    positions: Vec<u32>,
    /// The plain packing of the expanded rows.
    pub expanded: Packing,
    /// The packed row of each expanded row.
    pub gather: Vec<usize>,
    /// The expanded row that stands for each packed row: a prefix row's copy in its
    /// group's first branch, a branch row's only copy.
    pub owner: Vec<usize>,
    /// The prefix rows' other copies as (expanded rows, packed rows), in passes whose
    /// packed rows are distinct (pass k: the copies in every group's branch k + 1), so a
    /// pass can scatter-add without two writes to one row.
    pub copies: Vec<(Vec<usize>, Vec<usize>)>,
}

/// One group of a packing with shared prefixes: `prefix` tokens shared by sequences
/// whose own tokens after it number `branches[b]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub prefix: usize,
    pub branches: Vec<usize>,
}

impl Group {
    pub fn tokens(&self) -> usize {
        self.prefix + self.branches.iter().sum::<usize>()
    }
    fn shares(&self) -> bool {
        self.prefix > 0 && self.branches.len() > 1
    }
}

impl Packing {
    pub fn from_lengths(lengths: &[usize]) -> Self {
        let mut offsets = Vec::with_capacity(lengths.len() + 1);
        offsets.push(0);
        for l in lengths {
            offsets.push(offsets.last().unwrap() + l);
        }
        Packing {
            offsets,
            prefixes: None,
            dev: Default::default(),
        }
    }

    /// Groups of sequences sharing a prefix, packed in order. A group with one branch is
    /// a plain sequence of `prefix + branch` tokens; when no group shares, this is
    /// `from_lengths` of the group sizes.
    pub fn with_prefixes(groups: &[Group]) -> Self {
        assert!(
            groups.iter().all(|g| !g.branches.is_empty()),
            "a prefix group needs a branch"
        );
        let mut pack = Packing::from_lengths(&groups.iter().map(Group::tokens).collect::<Vec<_>>());
        if !groups.iter().any(Group::shares) {
            return pack;
        }
        let mut positions = Vec::with_capacity(pack.n_tokens());
        let (mut lengths, mut gather, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        let mut copies: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
        for (g, grp) in groups.iter().enumerate() {
            let start = pack.offsets[g];
            let p = grp.prefix;
            positions.extend(0..p as u32);
            owner.extend(gather.len()..gather.len() + p);
            let mut branch_row = start + p;
            for (b, &len) in grp.branches.iter().enumerate() {
                positions.extend(p as u32..(p + len) as u32);
                let e0 = gather.len();
                if b > 0 && p > 0 {
                    if copies.len() < b {
                        copies.push(Default::default());
                    }
                    copies[b - 1].0.extend(e0..e0 + p);
                    copies[b - 1].1.extend(start..start + p);
                }
                gather.extend(start..start + p);
                owner.extend(gather.len()..gather.len() + len);
                gather.extend(branch_row..branch_row + len);
                branch_row += len;
                lengths.push(p + len);
            }
        }
        pack.prefixes = Some(Box::new(Prefixes {
            positions,
            expanded: Packing::from_lengths(&lengths),
            gather,
            owner,
            copies,
        }));
        pack
    }

    /// Sequences; groups, with shared prefixes.
    pub fn n_seqs(&self) -> usize {
        self.offsets.len() - 1
    }
    pub fn n_tokens(&self) -> usize {
        *self.offsets.last().unwrap()
    }
    pub fn range(&self, s: usize) -> std::ops::Range<usize> {
        self.offsets[s]..self.offsets[s + 1]
    }
    /// The RoPE position of every row: its place in its sequence (a branch continues
    /// from its prefix's end).
    pub fn positions(&self) -> Vec<u32> {
        match &self.prefixes {
            Some(p) => p.positions.clone(),
            None => (0..self.n_seqs())
                .flat_map(|s| 0..self.range(s).len() as u32)
                .collect(),
        }
    }
    /// The expanded layout attention runs on, when prefixes are shared.
    pub fn prefixes(&self) -> Option<&Prefixes> {
        self.prefixes.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_groups_pack_as_sequences() {
        let groups = [
            Group {
                prefix: 3,
                branches: vec![2],
            },
            Group {
                prefix: 0,
                branches: vec![4],
            },
        ];
        let p = Packing::with_prefixes(&groups);
        assert!(p.prefixes().is_none());
        assert_eq!(p.offsets, vec![0, 5, 9]);
        assert_eq!(p.positions(), vec![0, 1, 2, 3, 4, 0, 1, 2, 3]);
    }

    #[test]
    fn shared_prefixes_expand_to_one_sequence_per_branch() {
        // group 0: prefix rows 0..2, branches rows 2..5 and 5..6, 6..8;
        // group 1: a plain sequence, rows 8..10; group 2: prefix 10, branches 11, 12..14.
        let groups = [
            Group {
                prefix: 2,
                branches: vec![3, 1, 2],
            },
            Group {
                prefix: 0,
                branches: vec![2],
            },
            Group {
                prefix: 1,
                branches: vec![1, 2],
            },
        ];
        let p = Packing::with_prefixes(&groups);
        assert_eq!(p.offsets, vec![0, 8, 10, 14]);
        assert_eq!(
            p.positions(),
            vec![0, 1, 2, 3, 4, 2, 2, 3, 0, 1, 0, 1, 1, 2]
        );
        let x = p.prefixes().unwrap();
        assert_eq!(x.expanded.offsets, vec![0, 5, 8, 12, 14, 16, 19]);
        #[rustfmt::skip]
        assert_eq!(x.gather, vec![
            0, 1, 2, 3, 4,  0, 1, 5,  0, 1, 6, 7,
            8, 9,
            10, 11,  10, 12, 13,
        ]);
        // Every packed row is stood for by one expanded row holding it.
        assert_eq!(x.owner.len(), p.n_tokens());
        for (row, &e) in x.owner.iter().enumerate() {
            assert_eq!(x.gather[e], row);
        }
        assert_eq!(
            x.owner,
            vec![0, 1, 2, 3, 4, 7, 10, 11, 12, 13, 14, 15, 17, 18]
        );
        // The other copies of prefix rows, each pass with distinct packed rows.
        assert_eq!(
            x.copies,
            vec![(vec![5, 6, 16], vec![0, 1, 10]), (vec![8, 9], vec![0, 1])]
        );
        // Positions of the expanded rows are those of their packed rows, and restart at 0
        // per expanded sequence (what a plain attention over them assumes).
        let pos = p.positions();
        let expanded_pos: Vec<u32> = x.gather.iter().map(|&r| pos[r]).collect();
        assert_eq!(expanded_pos, x.expanded.positions());
    }
}

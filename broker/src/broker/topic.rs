//! The topic exchange's binding table: a trie over the dot-separated words of binding keys,
//! where `*` matches exactly one word and `#` matches zero or more. Routing walks the trie once
//! per message instead of testing every binding.

use super::fast_map::FastMap;
use smallvec::SmallVec;

#[derive(Debug)]
pub struct TopicTrie<D> {
    root: Node<D>,
}

#[derive(Debug)]
struct Node<D> {
    words: FastMap<Box<[u8]>, Node<D>>,
    star: Option<Box<Node<D>>>,
    hash: Option<Box<Node<D>>>,
    destinations: Vec<D>,
}

impl<D> Default for Node<D> {
    fn default() -> Self {
        Self {
            words: FastMap::default(),
            star: None,
            hash: None,
            destinations: Vec::new(),
        }
    }
}

impl<D> Node<D> {
    fn is_empty(&self) -> bool {
        self.words.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
            && self.destinations.is_empty()
    }
}

impl<D> Default for TopicTrie<D> {
    fn default() -> Self {
        Self {
            root: Node::default(),
        }
    }
}

/// Splits a key into words; the empty key has no words (as in RabbitMQ), `a..b` has three.
fn words(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut parts = key.split(|b| *b == b'.');
    let empty = key.is_empty();
    std::iter::from_fn(move || if empty { None } else { parts.next() })
}

impl<D: Clone + PartialEq> TopicTrie<D> {
    pub fn insert(&mut self, pattern: &[u8], destination: D) {
        let mut node = &mut self.root;
        for word in words(pattern) {
            node = match word {
                b"*" => node.star.get_or_insert_with(Default::default),
                b"#" => node.hash.get_or_insert_with(Default::default),
                w => node.words.entry(w.into()).or_default(),
            };
        }
        if !node.destinations.contains(&destination) {
            node.destinations.push(destination);
        }
    }

    /// Removes one binding; returns whether it was there. Empty branches are pruned.
    pub fn remove(&mut self, pattern: &[u8], destination: &D) -> bool {
        let path: Vec<&[u8]> = words(pattern).collect();
        remove_at(&mut self.root, &path, destination)
    }

    /// Calls `found` for every destination whose pattern matches `key` (possibly more than once
    /// for a destination bound with several matching patterns: callers de-duplicate).
    pub fn route(&self, key: &[u8], found: &mut impl FnMut(&D)) {
        let key_words: SmallVec<[&[u8]; 16]> = words(key).collect();
        walk(&self.root, &key_words, found);
    }
}

fn remove_at<D: PartialEq>(node: &mut Node<D>, path: &[&[u8]], destination: &D) -> bool {
    let Some((first, rest)) = path.split_first() else {
        let before = node.destinations.len();
        node.destinations.retain(|d| d != destination);
        return node.destinations.len() != before;
    };
    let removed;
    match *first {
        b"*" | b"#" => {
            let slot = if *first == b"*" {
                &mut node.star
            } else {
                &mut node.hash
            };
            let Some(child) = slot.as_mut() else {
                return false;
            };
            removed = remove_at(child, rest, destination);
            if child.is_empty() {
                *slot = None;
            }
        }
        w => {
            let Some(child) = node.words.get_mut(w) else {
                return false;
            };
            removed = remove_at(child, rest, destination);
            if child.is_empty() {
                node.words.remove(w);
            }
        }
    }
    removed
}

fn walk<D>(node: &Node<D>, key: &[&[u8]], found: &mut impl FnMut(&D)) {
    if let Some(hash) = &node.hash {
        // `#` swallows zero or more words: try every split point.
        for skip in 0..=key.len() {
            walk(hash, &key[skip..], found);
        }
    }
    let Some((first, rest)) = key.split_first() else {
        node.destinations.iter().for_each(&mut *found);
        return;
    };
    if let Some(child) = node.words.get(*first) {
        walk(child, rest, found);
    }
    if let Some(star) = &node.star {
        walk(star, rest, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, key: &str) -> bool {
        let mut trie = TopicTrie::default();
        trie.insert(pattern.as_bytes(), 1);
        let mut hit = false;
        trie.route(key.as_bytes(), &mut |_| hit = true);
        hit
    }

    #[test]
    fn star_matches_exactly_one_word() {
        assert!(matches("a.*.c", "a.b.c"));
        assert!(!matches("a.*.c", "a.c"));
        assert!(!matches("a.*.c", "a.b.b.c"));
        assert!(matches("*", "x"));
        assert!(!matches("*", ""));
        assert!(matches("a.*", "a."));
    }

    #[test]
    fn hash_matches_zero_or_more_words() {
        assert!(matches("#", ""));
        assert!(matches("#", "a.b.c"));
        assert!(matches("a.#", "a"));
        assert!(matches("a.#", "a.b.c"));
        assert!(matches("a.#.b", "a.b"));
        assert!(matches("a.#.b", "a.x.y.b"));
        assert!(!matches("a.#.b", "a.x.y.c"));
        assert!(matches("#.b", "b"));
        assert!(matches("#.#", "a"));
        assert!(matches("*.#", "a"));
        assert!(!matches("*.#", ""));
    }

    #[test]
    fn literal_words_and_empty_words() {
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.bb"));
        assert!(matches("", ""));
        assert!(!matches("", "a"));
        assert!(matches("a..b", "a..b"));
        assert!(matches("a.*.b", "a..b"));
    }

    #[test]
    fn remove_prunes_and_reports() {
        let mut trie = TopicTrie::default();
        trie.insert(b"a.#", 1);
        trie.insert(b"a.#", 2);
        assert!(trie.remove(b"a.#", &1));
        assert!(!trie.remove(b"a.#", &1));
        let mut got = Vec::new();
        trie.route(b"a.b", &mut |d| got.push(*d));
        assert_eq!(got, vec![2]);
        assert!(trie.remove(b"a.#", &2));
        assert!(trie.root.is_empty());
    }
}

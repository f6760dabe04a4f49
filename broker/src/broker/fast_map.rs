//! The hash map of the publish path, shared by routing, exchanges and vhosts.

use std::collections::HashMap;

/// Maps keyed by names on the publish path (exchange and queue names, routing keys): foldhash,
/// randomly seeded per map like the standard hasher, but several times faster on short keys.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

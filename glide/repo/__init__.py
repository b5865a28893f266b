"""What lives in the object store: packs, the manifest tree, reachability and GC."""

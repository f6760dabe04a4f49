//! The shared log's writer thread: takes everything queued, writes it in order, syncs it,
//! deletes the segments a purge freed, then runs the callbacks of the batch.

use super::{Chunk, Shared, segment};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Shared {
    pub(super) fn run(self: Arc<Self>) {
        // The segment written last, kept open between batches.
        let mut current: Option<(u32, Arc<File>)> = None;
        loop {
            let (chunks, done, delete_below) = {
                let mut st = self.state.lock();
                while st.pending.is_empty() && st.done.is_empty() && !st.stop {
                    self.wake.wait(&mut st);
                }
                if st.pending.is_empty() && st.done.is_empty() {
                    return;
                }
                #[cfg(test)]
                let mut st = {
                    drop(st);
                    let _pause = self.pause.lock();
                    self.state.lock()
                };
                (
                    std::mem::take(&mut st.pending),
                    std::mem::take(&mut st.done),
                    st.delete_below,
                )
            };
            let result = self.write_batch(&chunks, &mut current);
            if result.is_ok() {
                // Before the callbacks: whoever waits for a batch after a purge finds the
                // segments it freed gone.
                let doomed = self.take_deletable(delete_below);
                self.delete(doomed);
            }
            {
                let mut st = self.state.lock();
                match &result {
                    Ok(()) => {
                        if let Some(last) = chunks.last() {
                            st.durable = (last.segment, last.offset + last.bytes.len() as u64);
                        }
                        st.evict(self.options.cache_bytes);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, dir = %self.dir.display(), "raft log: write failed, the log is unusable until restart");
                        st.failed = Some(e.to_string());
                    }
                }
            }
            for d in done {
                d(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                });
            }
            if result.is_err() {
                // Nothing more is written: what is still queued fails the same way.
                let mut st = self.state.lock();
                st.pending.clear();
                let done = std::mem::take(&mut st.done);
                drop(st);
                for d in done {
                    d(Err(io::Error::other("raft log write failed")));
                }
            }
        }
    }

    /// Writes the chunks in order and syncs them. A segment is synced before the next one is
    /// written, so that after a crash only the last segment can have a torn tail.
    fn write_batch(
        &self,
        chunks: &[Chunk],
        current: &mut Option<(u32, Arc<File>)>,
    ) -> io::Result<()> {
        let mut dirty = false;
        let mut created = false;
        for chunk in chunks {
            if current.as_ref().map(|(n, _)| *n) != Some(chunk.segment) {
                if let Some((_, file)) = current.as_ref().filter(|_| dirty) {
                    self.sync(file)?;
                }
                let path = self.dir.join(segment::file_name(chunk.segment));
                let file = Arc::new(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&path)?,
                );
                self.state.lock().files.insert(chunk.segment, file.clone());
                *current = Some((chunk.segment, file));
                created = true;
            }
            let (_, file) = current.as_ref().expect("opened above");
            file.write_all_at(&chunk.bytes, chunk.offset)?;
            self.stats
                .bytes
                .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
            dirty = true;
        }
        if created {
            self.sync(&File::open(&self.dir)?)?;
        }
        if let Some((_, file)) = current.as_ref().filter(|_| dirty) {
            self.sync(file)?;
        }
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn sync(&self, file: &File) -> io::Result<()> {
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        file.sync_data()
    }

    /// Forgets the segments below `below` and returns their paths.
    fn take_deletable(&self, below: u32) -> Vec<PathBuf> {
        let mut st = self.state.lock();
        let doomed: Vec<u32> = st.files.range(..below).map(|(n, _)| *n).collect();
        for n in &doomed {
            st.files.remove(n);
        }
        doomed
            .into_iter()
            .map(|n| self.dir.join(segment::file_name(n)))
            .collect()
    }

    fn delete(&self, paths: Vec<PathBuf>) {
        if paths.is_empty() {
            return;
        }
        for path in &paths {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(file = %path.display(), error = %e, "raft log: cannot delete a purged segment");
            }
        }
        if let Err(e) = File::open(&self.dir).and_then(|d| self.sync(&d)) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "raft log: cannot sync the directory");
        }
    }
}

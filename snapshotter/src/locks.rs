//! Duplicate suppression: a keyed async mutex (one remote Prepare per chain
//! ID at a time) and a singleflight (one resolution per layer digest; who
//! else asks meanwhile waits for, and gets, the same result).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::OwnedMutexGuard;

type LockMap<K> = Arc<Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>>;

/// An async mutex per key. Entries exist only while someone holds or waits
/// for the key, so the map does not grow with every key ever seen.
pub struct KeyedMutex<K> {
    locks: LockMap<K>,
}

impl<K> Default for KeyedMutex<K> {
    fn default() -> Self {
        KeyedMutex {
            locks: Arc::default(),
        }
    }
}

/// Holds the lock of one key; released on drop.
pub struct KeyedGuard<K: Eq + Hash> {
    locks: LockMap<K>,
    key: K,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone> KeyedMutex<K> {
    pub async fn lock(&self, key: K) -> KeyedGuard<K> {
        let mutex = {
            let mut map = self.locks.lock().expect("keyed mutex map poisoned");
            map.entry(key.clone()).or_default().clone()
        };
        let guard = mutex.lock_owned().await;
        KeyedGuard {
            locks: self.locks.clone(),
            key,
            guard: Some(guard),
        }
    }

    /// Keys currently held or waited for.
    pub fn len(&self) -> usize {
        self.locks.lock().expect("keyed mutex map poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Eq + Hash> Drop for KeyedGuard<K> {
    fn drop(&mut self) {
        // Release first, so the strong count below only counts the map and
        // the waiters.
        self.guard.take();
        let mut map = self.locks.lock().expect("keyed mutex map poisoned");
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

type Flight<V> = Shared<BoxFuture<'static, V>>;

/// Runs one future per key at a time; concurrent callers of the same key
/// share its result. Once it finished, the next call runs again (results
/// are not cached).
pub struct Singleflight<K, V: Clone> {
    flights: Mutex<HashMap<K, Flight<V>>>,
}

impl<K, V: Clone> Default for Singleflight<K, V> {
    fn default() -> Self {
        Singleflight {
            flights: Mutex::default(),
        }
    }
}

impl<K, V> Singleflight<K, V>
where
    K: Eq + Hash + Clone,
    V: Clone + Send + Sync + 'static,
{
    /// Returns the result of the flight for `key`, starting `make()` if
    /// none is running. `make` is only called by the caller that starts it.
    pub async fn run<F, Fut>(&self, key: K, make: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let flight = {
            let mut map = self.flights.lock().expect("singleflight map poisoned");
            map.entry(key.clone())
                .or_insert_with(|| make().boxed().shared())
                .clone()
        };
        let value = flight.clone().await;
        let mut map = self.flights.lock().expect("singleflight map poisoned");
        // Only remove our own flight: a later one may already be running.
        if map.get(&key).is_some_and(|f| f.ptr_eq(&flight)) {
            map.remove(&key);
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keyed_mutex_serialises_one_key_only() {
        let locks = Arc::new(KeyedMutex::<String>::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..16 {
            let (locks, inside, max) = (locks.clone(), inside.clone(), max.clone());
            tasks.push(tokio::spawn(async move {
                let key = if i % 2 == 0 { "a" } else { "b" };
                let _g = locks.lock(key.to_string()).await;
                if key == "a" {
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            max.load(Ordering::SeqCst),
            1,
            "two holders of key a at once"
        );
        assert!(locks.is_empty(), "released keys must not stay in the map");
    }

    #[tokio::test]
    async fn different_keys_do_not_block_each_other() {
        let locks = KeyedMutex::<u32>::default();
        let _a = locks.lock(1).await;
        let b = tokio::time::timeout(Duration::from_secs(1), locks.lock(2)).await;
        assert!(b.is_ok());
        assert_eq!(locks.len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn singleflight_shares_one_run() {
        let sf = Arc::new(Singleflight::<String, Arc<String>>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (sf, runs) = (sf.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                sf.run("layer".into(), || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Arc::new("toc".to_string())
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().as_str(), "toc");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        // Finished flights are not cached: a later call runs again.
        let again = sf
            .run("layer".into(), || async { Arc::new("second".to_string()) })
            .await;
        assert_eq!(again.as_str(), "second");
    }
}

//! Who may call, and how often: API keys judged from memory (the key cache over the store), the
//! rate-limit policies and their limiters (in process, or shared in Redis), and load shedding's
//! adaptive limit. Services only: they take the cache, store, limiter and clock they need, never
//! the app state, and know no route or handler.

pub mod keys;
pub mod limits;
pub mod redis_limiter;
pub mod shed;

//! The stream watchdog: cuts a call whose client stops making progress, so a
//! stalled stream cannot hold its reservation (and a stream slot) for ever.
//!
//! Progress is measured only while the server waits on the client. On the
//! request side that is from the moment the handler asks for the next frame and
//! none has arrived; on the response side, from the moment a frame is handed to
//! hyper until hyper asks for the next one, which it does only once the
//! client's flow-control window has room. A slow disk or object store therefore
//! never counts against a client. A call is cut when one such wait lasts
//! `idle_timeout`, or when less than `min_throughput` per second moved over
//! `window` of waiting.
//!
//! What a cut does depends on how far the call got:
//! - before the handler answered (a Write upload, a unary body arriving): the
//!   admission layer drops the handler's future, exactly as when a client
//!   disconnects (an upload is suspended and stays resumable), and answers
//!   `DEADLINE_EXCEEDED`;
//! - while the response streams: the response body (the handler's stream and
//!   its buffers) is dropped at once, the reservation is given back except for
//!   what hyper and h2 may still buffer, and the stream ends with
//!   `DEADLINE_EXCEEDED` trailers as soon as hyper asks for more.
//!
//! One task per call sleeps until the next moment a limit could be reached;
//! it ends with the call.
//!
//! - `progress`: the limits, the reasons for a cut, the pure check;
//! - `body`: the request and response bodies that record progress;
//! - here: the state a call's parts share, and the watchdog task.

mod body;
mod progress;

use std::{
    sync::{Arc, Mutex, MutexGuard, Weak},
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use tonic::body::Body;

pub use progress::{Cut, Side, StreamLimits};

use self::{
    body::{RequestBody, ResponseBody},
    progress::{Progress, Window, check},
};
use super::{
    Guard,
    body::MAX_FRAME,
    budget::Permit,
    reclaim::{Holder, ReclaimReason},
};

/// What hyper and h2 may still hold of a response after its body is dropped:
/// hyper keeps the frame it waits to send, h2 the unsent part of the one before.
const TRANSPORT_HOLDS: u64 = 2 * MAX_FRAME as u64;

/// Keeps `waker` in `slot`, cloning it only when it wakes a different task.
fn store(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(w) if w.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}

/// One call's progress, shared by the admission layer's future, the request and
/// response bodies and the watchdog task.
pub(super) struct Watch {
    method: &'static str,
    limits: StreamLimits,
    state: Mutex<State>,
    /// The response body once the handler produced it: a cut drops it from here,
    /// whoever is (not) polling it.
    response: Mutex<Option<Body>>,
}

#[derive(Default)]
struct State {
    request: Progress,
    response: Progress,
    cut: Option<Cut>,
    trailers_sent: bool,
    /// The call's reservation, to give back on a cut.
    permit: Weak<Mutex<Permit>>,
    /// What a cut response keeps for hyper's and h2's buffers until it is dropped.
    kept: Option<Permit>,
    /// The layer's future, while it waits for the handler.
    call: Option<Waker>,
    request_waker: Option<Waker>,
    response_waker: Option<Waker>,
    watchdog: Option<Waker>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = st.watchdog.take() {
            w.wake();
        }
    }
}

impl Watch {
    /// Watches a call of `method` and starts its watchdog task.
    pub(super) fn start(method: &'static str, limits: StreamLimits, guard: Guard) -> Arc<Self> {
        let watch = Arc::new(Self {
            method,
            limits,
            state: Mutex::new(State {
                request: Progress {
                    active: true,
                    ..Progress::default()
                },
                ..State::default()
            }),
            response: Mutex::new(None),
        });
        tokio::spawn(watchdog(Arc::downgrade(&watch), guard));
        watch
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self) -> MutexGuard<'_, Option<Body>> {
        self.response.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The call was admitted with this reservation; from now on the
    /// reclaimer may end it.
    pub(super) fn admitted(self: &Arc<Self>, permit: &Arc<Mutex<Permit>>, guard: &Guard) {
        self.lock().permit = Arc::downgrade(permit);
        let holder: Weak<dyn Holder> = Arc::downgrade(self) as Weak<dyn Holder>;
        guard.holders().add(holder);
    }

    /// Wraps the request body to record progress.
    pub(super) fn request_body(self: &Arc<Self>, inner: Body) -> Body {
        Body::new(RequestBody {
            inner,
            watch: self.clone(),
        })
    }

    /// Takes the response body into the watch; the returned body reads from it.
    pub(super) fn response_body(self: &Arc<Self>, inner: Body) -> Body {
        *self.slot() = Some(inner);
        let waker = {
            let mut st = self.lock();
            st.response.active = true;
            st.watchdog.take()
        };
        // The watchdog may be sleeping with nothing to watch.
        if let Some(w) = waker {
            w.wake();
        }
        Body::new(ResponseBody {
            watch: self.clone(),
        })
    }

    /// Ready with the cut once there is one, for the layer's future.
    pub(super) fn poll_cut(&self, cx: &mut Context<'_>) -> Poll<Cut> {
        let mut st = self.lock();
        match st.cut {
            Some(cut) => Poll::Ready(cut),
            None => {
                store(&mut st.call, cx.waker());
                Poll::Pending
            }
        }
    }

    fn check(&self, windows: &mut [Window; 2], now: Instant) -> Result<Option<Duration>, Cut> {
        let st = self.lock();
        if st.cut.is_some() {
            return Ok(None);
        }
        let [req, resp] = windows;
        let a = check(&st.request, req, &self.limits, Side::Request, now)?;
        let b = check(&st.response, resp, &self.limits, Side::Response, now)?;
        Ok(match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn cut(&self, cut: Cut) {
        let wakers = {
            let mut st = self.lock();
            st.cut = Some(cut);
            if st.response.active
                && let Some(permit) = st.permit.upgrade()
            {
                let kept = permit
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .split(TRANSPORT_HOLDS);
                st.kept = Some(kept);
            }
            [
                st.call.take(),
                st.request_waker.take(),
                st.response_waker.take(),
            ]
        };
        // Outside the state lock: the body may own the request body, whose drop
        // takes it.
        let body = self.slot().take();
        drop(body);
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
    }
}

impl Holder for Watch {
    fn holding(&self) -> Option<(Arc<str>, u64)> {
        let permit = {
            let st = self.lock();
            if st.cut.is_some() {
                return None;
            }
            st.permit.upgrade()?
        };
        let p = permit.lock().unwrap_or_else(|e| e.into_inner());
        Some((p.client().clone(), p.bytes()))
    }

    fn quiet_for(&self, now: Instant) -> Option<Duration> {
        let st = self.lock();
        if st.cut.is_some() {
            return None;
        }
        [&st.request, &st.response]
            .into_iter()
            .filter(|p| p.active)
            .filter_map(|p| p.waiting_since)
            .map(|since| now.saturating_duration_since(since))
            .max()
    }

    fn method(&self) -> &'static str {
        self.method
    }

    fn reclaim(&self, reason: ReclaimReason, bytes: u64, pushback: Duration) -> bool {
        if self.lock().cut.is_some() {
            return false;
        }
        self.cut(Cut::Reclaimed {
            reason,
            bytes,
            pushback,
        });
        true
    }
}

/// Sleeps until a limit could be reached, checks, and cuts; ends with the call.
async fn watchdog(watch: Weak<Watch>, guard: Guard) {
    let mut windows = [Window::default(); 2];
    loop {
        let next = {
            let Some(w) = watch.upgrade() else { return };
            match w.check(&mut windows, Instant::now()) {
                Ok(next) => next,
                Err(cut) => {
                    tracing::info!(method = w.method, reason = cut.reason(), %cut, "stream cut");
                    guard.observer().stream_cut(w.method, cut.reason());
                    w.cut(cut);
                    return;
                }
            }
        };
        // Woken early when the call ends or its response starts.
        let mut registered = false;
        let woken = std::future::poll_fn(|cx| {
            if registered {
                return Poll::Ready(());
            }
            registered = true;
            match watch.upgrade() {
                None => Poll::Ready(()),
                Some(w) => {
                    store(&mut w.lock().watchdog, cx.waker());
                    Poll::Pending
                }
            }
        });
        match next {
            Some(d) => {
                tokio::select! {
                    () = tokio::time::sleep(d) => {}
                    () = woken => {}
                }
            }
            None => woken.await,
        }
    }
}

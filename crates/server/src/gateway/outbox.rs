//! A connection's outbound queue and its "you must close" signal, in one small object.
//!
//! A tokio `mpsc` channel costs about 1.3 KB per connection before a frame is sent (its
//! shared state and a 32-slot block, plus a second block once a burst passes 32), and the
//! kill and restart signals were two more allocations. Idle participants are the common
//! case, so the queue here is a `VecDeque` that holds memory only while frames wait, and
//! one `Notify` wakes the connection for frames and for a close alike.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, Ordering};

use tokio::sync::Notify;

use super::lock;

/// What the connection task must do next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    Frame(Arc<str>),
    Close(u16),
}

#[derive(Debug)]
pub(super) struct Outbox {
    frames: Mutex<VecDeque<Arc<str>>>,
    /// 0 while open; otherwise the close code the connection must end with.
    close: AtomicU16,
    wake: Notify,
    capacity: usize,
}

/// A drained queue that grew past this gives its memory back.
const KEEP: usize = 8;

impl Outbox {
    pub(super) fn new(capacity: usize) -> Self {
        Outbox {
            frames: Mutex::new(VecDeque::new()),
            close: AtomicU16::new(0),
            wake: Notify::new(),
            capacity,
        }
    }

    /// Queues a frame; false when the queue is full (the reader is too slow).
    pub(super) fn push(&self, frame: Arc<str>) -> bool {
        {
            let mut q = lock(&self.frames);
            if q.len() >= self.capacity {
                return false;
            }
            q.push_back(frame);
        }
        self.wake.notify_one();
        true
    }

    /// Asks the connection to close with `code`; the first code asked for wins.
    pub(super) fn close(&self, code: u16) {
        if self
            .close
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.wake.notify_one();
        }
    }

    /// Queues a frame, or closes with `overflow_code` when the queue is full.
    pub(super) fn push_or_close(&self, frame: Arc<str>, overflow_code: u16) {
        if !self.push(frame) {
            self.close(overflow_code);
        }
    }

    /// The next frame, or the close asked for (which goes before any frame still queued).
    pub(super) async fn next(&self) -> Next {
        loop {
            if let Some(code) = self.closing() {
                return Next::Close(code);
            }
            {
                let mut q = lock(&self.frames);
                if let Some(f) = q.pop_front() {
                    if q.is_empty() && q.capacity() > KEEP {
                        *q = VecDeque::new();
                    }
                    return Next::Frame(f);
                }
            }
            // A push or close between the check above and this await is not lost:
            // `notify_one` leaves a permit when nobody waits.
            self.wake.notified().await;
        }
    }

    fn closing(&self) -> Option<u16> {
        match self.close.load(Ordering::Acquire) {
            0 => None,
            code => Some(code),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn frames_come_out_in_order_and_a_full_queue_refuses() {
        let o = Outbox::new(2);
        assert!(o.push("a".into()));
        assert!(o.push("b".into()));
        assert!(!o.push("c".into()), "full");
        run(async {
            assert_eq!(o.next().await, Next::Frame("a".into()));
            assert_eq!(o.next().await, Next::Frame("b".into()));
        });
        assert!(o.push("d".into()), "room again");
    }

    #[test]
    fn a_close_goes_before_queued_frames_and_the_first_code_wins() {
        let o = Outbox::new(4);
        o.push("a".into());
        o.close(4000);
        o.close(1012);
        run(async { assert_eq!(o.next().await, Next::Close(4000)) });
        let full = Outbox::new(1);
        full.push_or_close("a".into(), 4000);
        full.push_or_close("b".into(), 4000);
        run(async { assert_eq!(full.next().await, Next::Close(4000)) });
    }

    #[test]
    fn a_waiting_reader_is_woken_by_a_push_from_another_thread() {
        let o = Arc::new(Outbox::new(4));
        let writer = o.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            writer.push("late".into());
        });
        run(async { assert_eq!(o.next().await, Next::Frame("late".into())) });
        t.join().expect("writer thread");
    }

    #[test]
    fn a_drained_queue_gives_back_its_memory() {
        let o = Outbox::new(100);
        for _ in 0..50 {
            o.push("x".into());
        }
        run(async {
            for _ in 0..50 {
                o.next().await;
            }
        });
        assert_eq!(lock(&o.frames).capacity(), 0);
    }
}

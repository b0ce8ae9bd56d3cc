//! What the follower sends the leader (HAVEs, ACKs, an ERROR). It is written at once when the
//! socket takes it, and queued for a writer task only when the socket is full.
//!
//! A writer task alone would keep the reader from ever blocking on a leader that does not read,
//! but it runs only when the reader yields, and a reader with input waiting need not yield: an
//! ACK then waited behind the reading and writing of every round still in the socket (up to 8
//! ACKs went out in one write at 100,000 appends/s). Writing at once keeps the first property
//! and drops the wait. Order holds: nothing is written directly while the task has bytes queued.

use std::cell::Cell;
use std::rc::Rc;

use tokio::sync::mpsc;

use crate::engine::Conn;

pub struct Outbox {
    conn: Rc<Conn>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Bytes handed to the writer task and not yet written by it.
    queued_bytes: Rc<Cell<usize>>,
}

/// The writer task has ended (the connection is closing).
#[derive(Debug)]
pub struct Closed;

impl Outbox {
    /// The outbox for `conn`, and the writer task to spawn beside the reader.
    pub fn new(conn: Rc<Conn>) -> (Outbox, impl std::future::Future<Output = ()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued_bytes = Rc::new(Cell::new(0));
        let task = write_loop(conn.clone(), rx, queued_bytes.clone());
        (
            Outbox {
                conn,
                tx,
                queued_bytes,
            },
            task,
        )
    }

    /// Sends `out`: what the socket takes now leaves now, the rest goes to the writer task.
    pub fn send(&self, mut out: Vec<u8>) -> Result<(), Closed> {
        if out.is_empty() {
            return Ok(());
        }
        if self.queued_bytes.get() == 0 {
            match self.conn.try_write(&out) {
                Ok(n) if n == out.len() => return Ok(()),
                Ok(n) => {
                    out.drain(..n);
                }
                // Full, or a failure the writer task meets again and reports.
                Err(_) => {}
            }
        }
        self.queued_bytes.set(self.queued_bytes.get() + out.len());
        self.tx.send(out).map_err(|_| Closed)
    }
}

async fn write_loop(
    conn: Rc<Conn>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    queued_bytes: Rc<Cell<usize>>,
) {
    while let Some(mut out) = rx.recv().await {
        // Coalesce whatever else is queued into one write.
        while let Ok(more) = rx.try_recv() {
            out.extend_from_slice(&more);
        }
        let len = out.len();
        let (r, _) = conn.write_all(out).await;
        if let Err(e) = r {
            tracing::debug!("writing to the leader failed: {e}");
            return;
        }
        queued_bytes.set(queued_bytes.get().saturating_sub(len));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Duration;

    /// Runs `test` on a current-thread runtime, given an outbox on a follower's connection
    /// (its writer task spawned) and the leader's end of that connection.
    fn with_outbox<F, Fut>(test: F)
    where
        F: FnOnce(Outbox, tokio::task::JoinHandle<()>, std::net::TcpStream) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let conn = Rc::new(Conn::connect(addr).await.unwrap());
            let (peer, _) = listener.accept().unwrap();
            // Writable readiness is learned from the reactor once.
            tokio::task::yield_now().await;
            let (outbox, task) = Outbox::new(conn);
            let writer = tokio::task::spawn_local(task);
            test(outbox, writer, peer).await;
        });
    }

    /// An ACK reaches the leader's socket before the follower's runtime runs anything else.
    #[test]
    fn sends_at_once_without_yielding() {
        with_outbox(|outbox, _writer, mut peer| async move {
            peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            outbox.send(b"ack one".to_vec()).unwrap();
            // No await between the send and the read: a queued write would not have left.
            let mut got = [0u8; 7];
            peer.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ack one");
        });
    }

    /// Bytes that did not fit wait in the task, and later sends queue behind them, in order.
    #[test]
    fn keeps_order_when_the_socket_is_full() {
        with_outbox(|outbox, writer, peer| async move {
            // Far more than the socket buffers hold, sent while the leader reads slowly: the
            // socket keeps draining while bytes wait in the task, which runs only at the end.
            let chunks: Vec<Vec<u8>> = (0..64u32)
                .map(|i| (0..256 * 1024u32).map(|j| (i * 7 + j) as u8).collect())
                .collect();
            let sent = chunks.concat();
            let expected_len = sent.len();
            let reader = std::thread::spawn(move || {
                let mut peer = peer;
                let mut got = vec![0u8; expected_len];
                for piece in got.chunks_mut(64 * 1024) {
                    peer.read_exact(piece)?;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Ok::<_, std::io::Error>(got)
            });
            for chunk in chunks {
                outbox.send(chunk).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            // Dropping the outbox ends the task once it has written what is queued.
            drop(outbox);
            writer.await.unwrap();
            let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
                .await
                .unwrap()
                .unwrap();
            assert!(got == sent, "the leader received the bytes out of order");
        });
    }
}

//! The follower's read buffer: what came from the leader and is not parsed yet. Frames and
//! the payload bytes behind them are taken from the front by moving a cursor, not by moving
//! the rest of the buffer down (one read can bring hundreds of frames); the unparsed tail, at
//! most a partial frame, moves to the front only before the next read, which lands in the
//! spare capacity (`Conn::read_more`). So a byte read from the socket is copied once more at
//! most: into its file.

pub struct Input {
    bytes: Vec<u8>,
    /// Where the unparsed bytes begin.
    start: usize,
}

impl Input {
    pub fn new() -> Input {
        Input {
            bytes: Vec::new(),
            start: 0,
        }
    }

    /// The bytes not parsed yet.
    pub fn unread(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    /// Marks the first `n` unread bytes parsed (all of them if fewer are left).
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.bytes.len());
        if self.start == self.bytes.len() {
            self.bytes.clear();
            self.start = 0;
        }
    }

    /// The buffer, for a read into its spare capacity: the unread bytes moved to its front,
    /// and room for at least `read_bytes` behind them. Give it back with `refill`.
    pub fn for_read(&mut self, read_bytes: usize) -> Vec<u8> {
        if self.start > 0 {
            self.bytes.copy_within(self.start.., 0);
            self.bytes.truncate(self.bytes.len() - self.start);
            self.start = 0;
        }
        self.bytes.reserve(read_bytes);
        std::mem::take(&mut self.bytes)
    }

    /// Takes the buffer back after a read appended to it.
    pub fn refill(&mut self, bytes: Vec<u8>) {
        self.bytes = bytes;
        self.start = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(input: &mut Input, room: usize, arrived: &[u8]) {
        let mut buf = input.for_read(room);
        assert!(buf.capacity() - buf.len() >= room);
        buf.extend_from_slice(arrived);
        input.refill(buf);
    }

    #[test]
    fn parsed_bytes_are_skipped_and_the_rest_kept_in_order_across_reads() {
        let mut input = Input::new();
        assert!(input.unread().is_empty());
        read(&mut input, 16, b"frame1frame2fra");
        input.consume(6);
        assert_eq!(input.unread(), b"frame2fra");
        input.consume(6);
        // The partial frame moves to the front, and the next read lands behind it.
        read(&mut input, 16, b"me3");
        assert_eq!(input.unread(), b"frame3");
        input.consume(100);
        assert!(input.unread().is_empty());
        read(&mut input, 4, b"next");
        assert_eq!(input.unread(), b"next");
    }

    #[test]
    fn a_buffer_whose_bytes_were_all_parsed_starts_over_at_its_front() {
        let mut input = Input::new();
        read(&mut input, 64, &[7; 40]);
        let capacity = input.bytes.capacity();
        input.consume(40);
        // Room for 64 again without growing: nothing is kept.
        let buf = input.for_read(64);
        assert!(buf.is_empty());
        assert_eq!(buf.capacity(), capacity);
    }
}

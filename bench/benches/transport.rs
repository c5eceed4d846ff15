//! Raw TCP transport figures: the baselines every DSM figure is compared to.
//!
//! * `tcp_round_trip/16B_request_4KiB_reply`: one request/response pair
//!   between two ranks on loopback, the shape of a page fetch.
//! * `tcp_stream/1MiB_messages`: one-way bandwidth with 1 MiB messages.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dsm_core::bootstrap::Bootstrap;
use dsm_core::Transport;
use transport_tcp::TcpTransport;

fn pair() -> (Arc<TcpTransport>, Arc<TcpTransport>) {
    let mut boots = Bootstrap::loopback_group(2).expect("loopback job");
    let b1 = boots.pop().expect("rank 1");
    let b0 = boots.pop().expect("rank 0");
    let other = thread::spawn(move || {
        TcpTransport::connect(b1, &dsm_bench::tcp_options(1)).expect("rank 1 connects")
    });
    let t0 = TcpTransport::connect(b0, &dsm_bench::tcp_options(0)).expect("rank 0 connects");
    (t0, other.join().expect("rank 1 thread"))
}

fn round_trip(c: &mut Criterion) {
    let (client, server) = pair();
    let echo = thread::spawn(move || {
        let page = vec![7u8; 4096];
        while let Ok(m) = server.recv() {
            if m.payload == b"stop" {
                return;
            }
            server.send(m.from, &page).expect("reply");
        }
    });
    let request = [1u8; 16];
    let mut group = c.benchmark_group("tcp_round_trip");
    group.bench_function("16B_request_4KiB_reply", |b| {
        b.iter(|| {
            client.send(1, &request).expect("request");
            client.recv().expect("reply")
        })
    });
    group.finish();
    client.send(1, b"stop").expect("stop");
    echo.join().expect("echo thread");
}

fn stream(c: &mut Criterion) {
    let (sender, receiver) = pair();
    const MSG: usize = 1 << 20;
    let sink = thread::spawn(move || {
        while let Ok(m) = receiver.recv() {
            if m.payload.len() == 1 {
                return;
            }
            if m.payload.len() == 2 {
                receiver.send(0, b"ok").expect("ack");
            }
            // As the DSM's engine does with what it received.
            receiver.recycle(m.payload);
        }
    });
    let data = vec![3u8; MSG];
    let mut group = c.benchmark_group("tcp_stream");
    group.throughput(Throughput::Bytes(16 * MSG as u64));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("1MiB_messages", |b| {
        b.iter(|| {
            for _ in 0..16 {
                sender.send(1, &data).expect("send");
            }
            // A 2-byte message asks for an ack: the batch is counted once it arrived.
            sender.send(1, b"ak").expect("sync");
            sender.recv().expect("ack")
        })
    });
    group.finish();
    sender.send(1, b"x").expect("stop");
    sink.join().expect("sink thread");
}

criterion_group!(benches, round_trip, stream);
criterion_main!(benches);

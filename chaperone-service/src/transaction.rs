//! The transactional producer on a thread of its own, so the consume loop keeps counting
//! while a flush commits.
//!
//! The consume loop drains its tally into a [`Batch`] (audit records plus the consumer
//! positions reached when it drained) and hands it to the [`Committer`], which runs one
//! Kafka transaction for it: produce the records, `send_offsets_to_transaction`, commit.
//! At most one batch is in flight; the next flush waits until its [`Outcome`] has been
//! collected. The positions of a batch were read on the consume thread together with the
//! drain, so the offsets committed are exactly those of the messages counted in the batch.

use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DefaultProducerContext, Producer as _, PurgeConfig,
};
use rdkafka::types::RDKafkaErrorCode;

use crate::error::{PipelineError, fatal};
use crate::metrics::Metrics;

/// How to react to a transactional error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxnFailure {
    Retry,
    Abort,
    Fatal,
}

fn classify(e: &KafkaError) -> TxnFailure {
    match e {
        KafkaError::Transaction(rd) if rd.is_fatal() => TxnFailure::Fatal,
        KafkaError::Transaction(rd) if rd.txn_requires_abort() => TxnFailure::Abort,
        KafkaError::Transaction(rd) if rd.is_retriable() => TxnFailure::Retry,
        _ => TxnFailure::Abort,
    }
}

/// Runs a transactional call, again up to three times while it fails with an error librdkafka
/// calls retriable.
fn retried(
    action: &'static str,
    call: impl Fn() -> Result<(), KafkaError>,
) -> Result<(), (&'static str, KafkaError)> {
    let mut attempts = 0;
    loop {
        match call() {
            Ok(()) => return Ok(()),
            Err(e) if classify(&e) == TxnFailure::Retry && attempts < 3 => {
                attempts += 1;
                tracing::warn!(error = %e, attempts, action, "retrying");
            }
            Err(e) => return Err((action, e)),
        }
    }
}

/// What a batch counted, published once it is committed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Messages counted.
    pub messages: u64,
    /// Payload bytes counted.
    pub bytes: u64,
    /// Messages without an event time.
    pub no_timestamp: u64,
    /// Messages whose payload could not be dated.
    pub malformed: u64,
}

/// One flush: everything to commit in one transaction.
pub struct Batch {
    /// `counts` records (first) and `progress` records, as (key, payload).
    pub records: Vec<(String, Vec<u8>)>,
    /// How many of `records` are `counts` records.
    pub n_counts: usize,
    /// Consumer positions reached when the tally was drained.
    pub offsets: TopicPartitionList,
    /// The consumer's group metadata, when it has offsets to commit.
    pub group: Option<ConsumerGroupMetadata>,
    /// What the `counts` records add up to.
    pub totals: Totals,
    /// Consumer lag per partition, published on commit.
    pub lags: Vec<(String, i32, i64)>,
    /// When the flush began (for the flush duration metric).
    pub started: Instant,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("records", &self.records.len())
            .field("n_counts", &self.n_counts)
            .field("offsets", &self.offsets)
            .field("totals", &self.totals)
            .finish_non_exhaustive()
    }
}

/// How a batch ended.
#[derive(Debug)]
pub enum Outcome {
    /// Counts and offsets are committed.
    Committed,
    /// The transaction was aborted: nothing of it is visible and its offsets were not
    /// committed. Carries the number of messages it counted.
    Aborted {
        /// Messages counted in the aborted batch.
        discarded: u64,
    },
    /// The producer cannot continue (for example, it was fenced).
    Fatal(PipelineError),
}

/// Runs the transactions of the consume loop on a dedicated thread.
pub struct Committer {
    jobs: Option<SyncSender<Batch>>,
    outcomes: Receiver<Outcome>,
    in_flight: bool,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl Committer {
    /// Starts the committer thread around an initialised transactional producer.
    pub fn spawn(
        producer: BaseProducer<DefaultProducerContext>,
        audit_topic: String,
        timeout: Duration,
        metrics: Metrics,
    ) -> std::io::Result<Self> {
        let (jobs, job_rx) = mpsc::sync_channel::<Batch>(1);
        let (outcome_tx, outcomes) = mpsc::sync_channel::<Outcome>(1);
        let thread = std::thread::Builder::new()
            .name("chaperone-txn".into())
            .spawn(move || {
                let worker = Worker {
                    producer,
                    audit_topic,
                    timeout,
                    metrics,
                };
                for batch in job_rx {
                    let outcome = worker.commit(batch);
                    if outcome_tx.send(outcome).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            jobs: Some(jobs),
            outcomes,
            in_flight: false,
            thread: Some(thread),
        })
    }

    /// Whether a batch is being committed.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Hands a batch to the committer thread. The previous outcome must have been collected.
    pub fn submit(&mut self, batch: Batch) {
        debug_assert!(!self.in_flight, "one batch in flight at a time");
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(batch));
        // A send fails only when the thread is gone; `wait` then reports it as fatal.
        self.in_flight = true;
        if !matches!(sent, Some(Ok(()))) {
            tracing::error!("the transaction thread has stopped");
        }
    }

    /// The outcome of the batch in flight, if it has ended; never blocks.
    pub fn try_outcome(&mut self) -> Option<Outcome> {
        if !self.in_flight {
            return None;
        }
        match self.outcomes.try_recv() {
            Ok(o) => {
                self.in_flight = false;
                Some(o)
            }
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.in_flight = false;
                Some(thread_gone())
            }
        }
    }

    /// Waits for the outcome of the batch in flight; `None` when there is none.
    pub fn wait(&mut self) -> Option<Outcome> {
        if !self.in_flight {
            return None;
        }
        self.in_flight = false;
        Some(self.outcomes.recv().unwrap_or_else(|_| thread_gone()))
    }
}

fn thread_gone() -> Outcome {
    Outcome::Fatal(fatal(
        "committing a transaction (the transaction thread stopped)",
        KafkaError::Canceled,
    ))
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The committer thread's state.
struct Worker {
    producer: BaseProducer<DefaultProducerContext>,
    audit_topic: String,
    timeout: Duration,
    metrics: Metrics,
}

impl Worker {
    fn commit(&self, batch: Batch) -> Outcome {
        match self.transact(&batch) {
            Ok(()) => {
                let m = &self.metrics;
                m.transactions.with_label_values(&["committed"]).inc();
                m.records
                    .with_label_values(&["counts"])
                    .inc_by(batch.n_counts as u64);
                m.records
                    .with_label_values(&["progress"])
                    .inc_by((batch.records.len() - batch.n_counts) as u64);
                let t = batch.totals;
                m.committed(t.messages, t.bytes, t.no_timestamp, t.malformed);
                m.set_lags(&batch.lags);
                m.flush_duration
                    .observe(batch.started.elapsed().as_secs_f64());
                tracing::debug!(
                    messages = t.messages,
                    counts = batch.n_counts,
                    progress = batch.records.len() - batch.n_counts,
                    "committed flush"
                );
                Outcome::Committed
            }
            Err(Some(e)) => Outcome::Fatal(e),
            Err(None) => {
                self.metrics
                    .transactions
                    .with_label_values(&["aborted"])
                    .inc();
                Outcome::Aborted {
                    discarded: batch.totals.messages,
                }
            }
        }
    }

    /// Sends one record, waiting for queue space when the producer queue is full.
    fn send(&self, key: &str, payload: &[u8]) -> Result<(), KafkaError> {
        let deadline = Instant::now() + self.timeout;
        let mut record = BaseRecord::to(&self.audit_topic).key(key).payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if Instant::now() < deadline =>
                {
                    record = r;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Runs one transaction. `Err(None)`: it was aborted; `Err(Some)`: a fatal error.
    fn transact(&self, batch: &Batch) -> Result<(), Option<PipelineError>> {
        if let Err(e) = self.producer.begin_transaction() {
            tracing::error!(error = %e, "cannot begin a transaction");
            return Err(self.fail("beginning a transaction", e));
        }
        let started = Instant::now();
        let result = self.produce_and_commit(batch, started);
        match result {
            Ok(()) => Ok(()),
            Err((action, e)) => {
                tracing::warn!(error = %e, action, "transaction failed");
                match self.fail(action, e) {
                    Some(fatal) => Err(Some(fatal)),
                    None => self.abort(),
                }
            }
        }
    }

    fn produce_and_commit(
        &self,
        batch: &Batch,
        started: Instant,
    ) -> Result<(), (&'static str, KafkaError)> {
        for (key, payload) in &batch.records {
            self.send(key, payload)
                .map_err(|e| ("producing audit records", e))?;
        }
        let produced = started.elapsed();
        self.producer.poll(Duration::ZERO);
        if batch.offsets.count() > 0 {
            let group = batch
                .group
                .as_ref()
                .ok_or(("sending offsets to the transaction", KafkaError::Canceled))?;
            retried("sending offsets to the transaction", || {
                self.producer
                    .send_offsets_to_transaction(&batch.offsets, group, self.timeout)
            })?;
        }
        let offsets_sent = started.elapsed();
        // rdkafka's commit_transaction first flushes, polling in 100 ms steps whenever a
        // record is still in flight; wait for the records in 1 ms steps instead.
        let deadline = Instant::now() + self.timeout;
        while self.producer.in_flight_count() > 0 {
            if Instant::now() >= deadline {
                return Err((
                    "waiting for audit records to be acknowledged",
                    KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut),
                ));
            }
            self.producer.poll(Duration::from_millis(1));
        }
        retried("committing a transaction", || {
            self.producer.commit_transaction(self.timeout)
        })?;
        tracing::debug!(
            produce_ms = produced.as_millis() as u64,
            offsets_ms = (offsets_sent - produced).as_millis() as u64,
            commit_ms = (started.elapsed() - offsets_sent).as_millis() as u64,
            "transaction committed"
        );
        // Serve what the commit left on the queue (error reports only).
        for _ in 0..4 {
            self.producer.poll(Duration::ZERO);
        }
        Ok(())
    }

    /// The fatal error for `e`, or `None` when the transaction can be aborted.
    fn fail(&self, action: &'static str, e: KafkaError) -> Option<PipelineError> {
        match classify(&e) {
            TxnFailure::Fatal => {
                tracing::error!(error = %e, action, "fatal transactional error: stopping");
                Some(fatal(action, e))
            }
            _ => None,
        }
    }

    fn abort(&self) -> Result<(), Option<PipelineError>> {
        // abort_transaction waits for every outstanding record to be reported, and a
        // BaseProducer only reports them when polled: drop what is queued or in flight and
        // serve the reports first.
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        let deadline = Instant::now() + self.timeout;
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
            self.producer.poll(Duration::from_millis(1));
        }
        let mut attempts = 0;
        loop {
            match self.producer.abort_transaction(self.timeout) {
                Ok(()) => return Err(None),
                Err(e) if classify(&e) != TxnFailure::Fatal && attempts < 3 => {
                    attempts += 1;
                    tracing::warn!(error = %e, attempts, "retrying the transaction abort");
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot abort the transaction: stopping");
                    return Err(Some(fatal("aborting a transaction", e)));
                }
            }
        }
    }
}

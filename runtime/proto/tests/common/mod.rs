//! Seeded generators of wire messages for the integration tests.
#![allow(dead_code)]

use edgevlm_proto::*;
use heapless::{String, Vec};

/// splitmix64: small, fast, good enough to drive test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    pub fn bytes(&mut self, len: usize) -> std::vec::Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// Random messages; with `max` set, the largest encoding of each variant instead.
pub struct Gen {
    pub rng: Rng,
    pub max: bool,
}

pub const HOST_VARIANTS: usize = 11;
pub const RESPONSE_VARIANTS: usize = 8;
pub const ERROR_VARIANTS: usize = 16;
pub const TRACE_VARIANTS: usize = 5;
/// Responses, errors, and the event.
pub const AGENT_VARIANTS: usize = RESPONSE_VARIANTS + ERROR_VARIANTS + 1;

impl Gen {
    pub fn new(seed: u64) -> Self {
        Gen {
            rng: Rng::new(seed),
            max: false,
        }
    }

    pub fn max(seed: u64) -> Self {
        Gen {
            rng: Rng::new(seed),
            max: true,
        }
    }

    /// Spread over varint lengths.
    fn u64(&mut self) -> u64 {
        if self.max {
            return u64::MAX;
        }
        match self.rng.below(4) {
            0 => self.rng.below(128) as u64,
            1 => self.rng.below(1 << 20) as u64,
            2 => self.rng.next_u64(),
            _ => u64::MAX,
        }
    }

    fn u32(&mut self) -> u32 {
        if self.max {
            u32::MAX
        } else {
            self.u64() as u32
        }
    }

    fn u16(&mut self) -> u16 {
        if self.max {
            u16::MAX
        } else {
            self.u64() as u16
        }
    }

    fn bool(&mut self) -> bool {
        self.max || self.rng.chance(2)
    }

    fn string<const N: usize>(&mut self) -> String<N> {
        let mut s = String::new();
        if self.max {
            while s.push('x').is_ok() {}
            return s;
        }
        let len = self.rng.below(N + 1);
        while s.len() < len {
            let c = match self.rng.below(8) {
                0 => 'é',
                1 => '€',
                2 => '😀',
                _ => (b'a' + self.rng.below(26) as u8) as char,
            };
            if s.push(c).is_err() {
                break;
            }
        }
        s
    }

    fn sha(&mut self) -> Sha256 {
        core::array::from_fn(|_| self.rng.next_u64() as u8)
    }

    fn hello_host(&mut self) -> HostHello {
        let mut h = HostHello::new("0.1.0");
        h.host_version = self.string();
        if !self.max && self.rng.chance(8) {
            h.protocol = self.u16();
        }
        h
    }

    fn hello_agent(&mut self) -> AgentHello {
        AgentHello {
            magic: MAGIC,
            protocol: if self.max { u16::MAX } else { PROTOCOL_VERSION },
            agent_version: self.string(),
            board: self.string(),
            cpu: CpuInfo {
                arch: self.string(),
                model: self.string(),
                cores: self.u16(),
            },
            ram_total_kib: self.u64(),
            ram_available_kib: self.u64(),
            tract_version: self.string(),
            max_chunk: self.u32(),
        }
    }

    fn chunk(&mut self) -> Chunk {
        let len = if self.max {
            MAX_CHUNK
        } else if self.rng.chance(500) {
            MAX_CHUNK - self.rng.below(64)
        } else {
            self.rng.below(200)
        };
        let data = self.rng.bytes(len);
        let mut chunk = Chunk::new(UploadId(self.u32()), self.u16(), self.u64(), &data).unwrap();
        if self.max {
            chunk.crc32 = u32::MAX;
        }
        chunk
    }

    fn model_info(&mut self) -> ModelInfo {
        ModelInfo {
            name: self.string(),
            version: self.string(),
            files: self.u16(),
            bytes: self.u64(),
            manifest_sha256: self.sha(),
            active: self.bool(),
            previous: self.bool(),
        }
    }

    fn model_ref(&mut self) -> ModelRef {
        ModelRef {
            name: self.string(),
            version: self.string(),
        }
    }

    fn file_count(&mut self) -> usize {
        if self.max {
            MAX_PACKAGE_FILES
        } else {
            self.rng.below(MAX_PACKAGE_FILES + 1)
        }
    }

    fn trace_event(&mut self, variant: usize) -> TraceEvent {
        match variant % TRACE_VARIANTS {
            0 => TraceEvent::Span(StageSpan {
                iteration: self.u32(),
                stage: self.string(),
                start_us: self.u64(),
                duration_us: self.u64(),
            }),
            1 => TraceEvent::Token(TokenTiming {
                iteration: self.u32(),
                index: self.u32(),
                start_us: self.u64(),
                duration_us: self.u64(),
            }),
            2 => TraceEvent::Memory(MemorySample {
                t_us: self.u64(),
                rss_kib: self.u64(),
                pss_kib: self.u64(),
            }),
            3 => TraceEvent::Iteration(IterationDone {
                iteration: self.u32(),
                warmup: self.bool(),
                duration_us: self.u64(),
            }),
            _ => TraceEvent::Node(NodeTiming {
                rank: self.u16(),
                graph: self.string(),
                node: self.string(),
                op: self.string(),
                total_us: self.u64(),
                iterations: self.u32(),
                share_permille: self.u16(),
            }),
        }
    }

    fn trace_batch(&mut self) -> TraceBatch {
        let len = if self.max {
            MAX_TRACE_BATCH
        } else {
            self.rng.below(MAX_TRACE_BATCH + 1)
        };
        let mut events = Vec::new();
        for _ in 0..len {
            // In max mode every event is a node timing, the largest kind.
            let variant = if self.max {
                4
            } else {
                self.rng.below(TRACE_VARIANTS)
            };
            let _ = events.push(self.trace_event(variant));
        }
        TraceBatch {
            run: RunId(self.u32()),
            seq: self.u32(),
            dropped: self.u32(),
            events,
        }
    }

    fn bench_summary(&mut self) -> BenchSummary {
        BenchSummary {
            run: RunId(self.u32()),
            model: self.string(),
            version: self.string(),
            model_bytes: self.u64(),
            threads: self.u16(),
            warmup: self.u32(),
            iterations: self.u32(),
            load_us: self.u64(),
            first_run_us: self.u64(),
            latency: LatencyStats {
                min_us: self.u64(),
                mean_us: self.u64(),
                p50_us: self.u64(),
                p90_us: self.u64(),
                p99_us: self.u64(),
                max_us: self.u64(),
            },
            tokens: if self.bool() {
                Some(TokenStats {
                    prompt_tokens: self.u32(),
                    generated_tokens: self.u64(),
                    ttft_p50_us: self.u64(),
                    inter_token_p50_us: self.u64(),
                })
            } else {
                None
            },
            peak_rss_kib: self.u64(),
            peak_pss_kib: self.u64(),
            dropped_events: self.u32(),
            load_source: [
                LoadSource::Onnx,
                LoadSource::Cache,
                LoadSource::OnnxDespiteCache,
            ][self.u32() as usize % 3],
        }
    }

    pub fn request(&mut self, variant: usize) -> Request {
        match variant % HOST_VARIANTS {
            0 => Request::Hello(self.hello_host()),
            1 => Request::ListModels,
            2 => {
                let model = self.model_ref();
                let mut files = Vec::new();
                for _ in 0..self.file_count() {
                    let _ = files.push(FileSpec {
                        path: self.string(),
                        size: self.u64(),
                        sha256: self.sha(),
                    });
                }
                Request::BeginUpload(UploadSpec { model, files })
            }
            3 => Request::Rollback,
            4 => Request::PushChunk(self.chunk()),
            5 => Request::Commit {
                upload: UploadId(self.u32()),
            },
            6 => Request::Activate(self.model_ref()),
            7 => Request::Remove(self.model_ref()),
            8 => Request::RunBenchmark(BenchSpec {
                model: self.model_ref(),
                warmup: self.u32(),
                iterations: self.u32(),
                min_duration_ms: self.u32(),
                threads: self.u16(),
                input: match if self.max { 2 } else { self.rng.below(3) } {
                    0 => BenchInput::Synthetic { seed: self.u64() },
                    1 => BenchInput::PackageFile(self.string()),
                    _ => {
                        let len = if self.max {
                            MAX_INLINE_INPUT
                        } else {
                            self.rng.below(300)
                        };
                        BenchInput::Image(Vec::from_slice(&self.rng.bytes(len)).unwrap())
                    }
                },
                prompt: self.string(),
                max_new_tokens: self.u32(),
                trace: TraceOptions {
                    spans: self.bool(),
                    tokens: self.bool(),
                    memory_interval_ms: self.u16(),
                    top_nodes: self.u16(),
                },
            }),
            9 => Request::FetchTraces {
                run: if self.bool() {
                    Some(RunId(self.u32()))
                } else {
                    None
                },
            },
            _ => Request::Cancel {
                id: RequestId(self.u32()),
            },
        }
    }

    pub fn response(&mut self, variant: usize) -> Response {
        match variant % RESPONSE_VARIANTS {
            0 => Response::Hello(self.hello_agent()),
            1 => Response::Done,
            2 => {
                let len = if self.max {
                    MAX_MODELS
                } else {
                    self.rng.below(MAX_MODELS + 1)
                };
                let mut models = Vec::new();
                for _ in 0..len {
                    let _ = models.push(self.model_info());
                }
                Response::Models(models)
            }
            3 => {
                let mut verified = Vec::new();
                for _ in 0..self.file_count() {
                    let _ = verified.push(self.u64());
                }
                Response::Upload(UploadState {
                    upload: UploadId(self.u32()),
                    verified,
                })
            }
            7 => Response::ChunkAccepted {
                file: self.u16(),
                verified: self.u64(),
            },
            4 => Response::Committed(self.model_info()),
            5 => Response::BenchDone(self.bench_summary()),
            _ => Response::TracesDone {
                run: RunId(self.u32()),
                batches: self.u32(),
            },
        }
    }

    pub fn error(&mut self, variant: usize) -> Error {
        match variant % ERROR_VARIANTS {
            0 => Error::VersionMismatch {
                host: self.u16(),
                agent: self.u16(),
            },
            1 => Error::BadMagic,
            2 => Error::NotFound,
            3 => Error::InvalidName,
            4 => Error::ChecksumMismatch { offset: self.u64() },
            5 => Error::DigestMismatch {
                file: self.string(),
            },
            6 => Error::OutOfOrder {
                expected: self.u64(),
            },
            7 => Error::Incomplete {
                file: self.string(),
                verified: self.u64(),
                size: self.u64(),
            },
            8 => Error::NoSpace {
                needed: self.u64(),
                available: self.u64(),
            },
            9 => Error::TooLarge { max: self.u64() },
            10 => Error::Busy,
            11 => Error::Cancelled,
            12 => Error::Unsupported,
            13 => Error::InvalidPackage(self.string()),
            14 => Error::Io(self.string()),
            _ => Error::Internal(self.string()),
        }
    }

    /// One host message of the given request variant.
    pub fn host_message_variant(&mut self, variant: usize) -> HostMessage {
        HostMessage {
            id: RequestId(self.u32()),
            request: self.request(variant),
        }
    }

    /// One agent message: responses, then errors, then the event.
    pub fn agent_message_variant(&mut self, variant: usize) -> AgentMessage {
        let id = RequestId(self.u32());
        let variant = variant % AGENT_VARIANTS;
        if variant < RESPONSE_VARIANTS {
            AgentMessage::Response {
                id,
                result: Ok(self.response(variant)),
            }
        } else if variant < RESPONSE_VARIANTS + ERROR_VARIANTS {
            AgentMessage::Response {
                id,
                result: Err(self.error(variant - RESPONSE_VARIANTS)),
            }
        } else {
            AgentMessage::Event {
                id,
                event: Event::Trace(self.trace_batch()),
            }
        }
    }

    pub fn host_message(&mut self) -> HostMessage {
        let v = self.rng.below(HOST_VARIANTS);
        self.host_message_variant(v)
    }

    pub fn agent_message(&mut self) -> AgentMessage {
        let v = self.rng.below(AGENT_VARIANTS);
        self.agent_message_variant(v)
    }
}

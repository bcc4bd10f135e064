# frozen_string_literal: true

require_relative "spec_helper"
require "open3"
require "timeout"

# Each kind in this process (Klass.start), standalone, through the gem's flowctl.v1 clients:
# the method's results, failures, max_concurrent, state, shutdown of open streams, the seed's
# protocol, and grpc.health.v1 through the official grpc gem's health stub.
RSpec.describe "Flowctl::Component kinds" do
  V1 = Flowctl::V1 unless defined?(V1)

  let(:started) { [] }
  let(:log_io) { StringIO.new }
  let(:log) { Logger.new(log_io) }
  let(:clients) { [] }

  after do
    clients.each(&:close)
    started.each { |rt| rt.stop(grace: 1) }
  end

  def start(klass, **opts)
    klass.start(control_plane: false, env: {}, logger: log, **opts).tap { |rt| started << rt }
  end

  def client(klass, rt)
    klass.new("127.0.0.1:#{rt.port}", tls: false).tap { |c| clients << c }
  end

  def event(i, type: "number", payload: i.to_s) = V1::Event.new(id: i.to_s, type: type, payload: payload)

  let(:square) do
    Class.new(Flowctl::Component::Processor) do
      info name: "square", version: "1.2.3", description: "squares", input_event_types: ["number"],
           output_event_types: ["squared"], metadata: { "team" => "a" }
      attr_reader :dead

      def process(event)
        n = Integer(event.payload) # "x" raises: that event fails
        case n
        when 0 then nil
        when 2 then [{ id: "2a", type: "squared", payload: "4" }, V1::Event.new(id: "2b", type: "squared", payload: "4")]
        when 3 then yield(V1::Event.new(id: "3", type: "squared", payload: "9"))
        when 5 then :not_an_event
        else V1::Event.new(id: event.id, type: "squared", payload: (n * n).to_s)
        end
      end

      def dead_letter(event, error) = (@dead ||= []) << [event.id, error.class]
    end
  end

  describe Flowctl::Component::Processor do
    it "maps each event to zero, one or many; a failing event is counted and never ends the stream" do
      rt = start(square)
      replies = client(V1::ProcessorClient, rt).process(%w[0 1 2 3 x 5 4].each_with_index.map { |p, i| event(i, payload: p) }).to_a
      expect(replies.map(&:id)).to eq(%w[1 2a 2b 3 6])
      expect(replies.map(&:payload)).to eq(%w[1 4 4 9 16])
      expect(rt.metrics.to_numbers).to include("events_received" => 7, "events_emitted" => 5, "events_failed" => 2,
                                               "in_flight" => 0)
      expect(rt.component.dead).to eq([["4", ArgumentError], ["5", TypeError]])
      expect(log_io.string).to include('event "4" failed: ArgumentError', 'event "5" failed: TypeError')
    end

    it "fails a message that is not a valid Event and goes on with the next (official grpc gem, raw bytes)" do
      rt = start(square)
      script = <<~'RUBY'
        require "grpc"
        stub = GRPC::ClientStub.new("127.0.0.1:#{ARGV[0]}", :this_channel_is_insecure)
        good = ["0a0131".b, "1a0133".b].map { |h| [h].pack("H*") }.join # id "1", payload "3"
        bad = ["0a02fffe"].pack("H*")                                     # id: invalid UTF-8
        replies = stub.bidi_streamer("/flowctl.v1.ProcessorService/Process", [bad, good, bad], ->(x) { x }, ->(x) { x })
        puts replies.map { |r| r.unpack1("H*") }.join(",")
      RUBY
      out, err, st = Open3.capture3(RbConfig.ruby, "-e", script, rt.port.to_s)
      expect(st.success?).to be(true), err
      expect(out.strip.split(",").map { |hex| V1::Event.decode([hex].pack("H*")).payload }).to eq(["9"])
      expect(rt.metrics.to_numbers).to include("events_failed" => 2, "events_received" => 1, "events_emitted" => 1)
      expect(log_io.string).to include("a message that is no event failed")
    end

    it "replies a failed event marked flowctl.error with failed_events: :reply (the default under flowctl-pipeline)" do
      inputs = %w[1 x 5].each_with_index.map { |p, i| event(i, payload: p).tap { |e| e.metadata = { "k" => "v" } } }
      rt = start(square, id: "sq", failed_events: :reply)
      replies = client(V1::ProcessorClient, rt).process(inputs).to_a
      expect(replies.map { |r| [r.id, r.type, r.payload] }).to eq([%w[0 squared 1], %w[1 number x], %w[2 number 5]])
      expect(replies[1].metadata).to eq("k" => "v", "flowctl.error" => 'ArgumentError: invalid value for Integer(): "x"',
                                        "flowctl.failed_at" => "sq")
      expect(replies[2].metadata["flowctl.error"]).to start_with("TypeError: expected a Flowctl::V1::Event")
      expect(rt.metrics.to_numbers).to include("events_failed" => 2, "events_emitted" => 1)
      expect(rt.component.dead).to eq([["1", ArgumentError], ["2", TypeError]])

      under_runner = start(square, env: { "FLOWCTL_INPUTS" => "src" })
      expect(under_runner.settings.failed_events).to eq(:reply)
      expect(client(V1::ProcessorClient, under_runner).process([event(0, payload: "x")]).map(&:id)).to eq(["0"])
      expect(start(square).settings.failed_events).to eq(:drop)
      expect(start(square, env: { "FLOWCTL_INPUTS" => "src", "FLOWCTL_FAILED_EVENTS" => "drop" }).settings.failed_events).to eq(:drop)
      expect { start(square, failed_events: :keep) }.to raise_error(ArgumentError, /failed_events: :keep must be one of drop, reply/)
    end

    it "answers GetInfo and HealthCheck" do
      rt = start(square, id: "sq-1")
      c = client(V1::ProcessorClient, rt)
      info = c.get_info(Flowctl::Protobuf::Empty.new)
      expect(info.to_h).to include(id: "sq-1", name: "square", version: "1.2.3", description: "squares",
                                   type: :COMPONENT_TYPE_PROCESSOR, input_event_types: ["number"],
                                   output_event_types: ["squared"], endpoint: "127.0.0.1:#{rt.port}", metadata: { "team" => "a" })
      health = c.health_check(include_details: true)
      expect(health.status).to eq(:HEALTH_STATUS_HEALTHY)
      expect(health.metrics).to include("events_received" => "0", "events_failed" => "0")
      expect(health.components.map(&:component_name)).to eq(["sq-1"])
      rt.component.status = :degraded
      expect(c.health_check.status).to eq(:HEALTH_STATUS_DEGRADED)
    end

    it "enforces max_concurrent over every stream" do
      gauge = Class.new(Flowctl::Component::Processor) do
        @lock = Mutex.new
        @now = @peak = 0
        class << self
          attr_reader :peak

          def enter = @lock.synchronize { @peak = [@peak, @now += 1].max }
          def leave = @lock.synchronize { @now -= 1 }
        end

        def process(event)
          self.class.enter
          sleep 0.02
          self.class.leave
          event
        end
      end
      rt = start(gauge, max_concurrent: 2)
      c = client(V1::ProcessorClient, rt)
      threads = Array.new(5) { |t| Thread.new { c.process(Array.new(10) { |i| event(t * 100 + i) }).to_a.size } }
      expect(threads.map(&:value)).to all(eq(10))
      expect(gauge.peak).to eq(2)
    end

    it "serves the seed's ProcessorService and GetCapabilities when asked" do
      rt = start(square, protocols: %i[v1 seed], max_concurrent: 4, id: "sq-seed")
      seed = client(Flowctl::Processor::Client, rt)
      caps = seed.get_capabilities
      expect(caps.to_h).to include(processor_id: "sq-seed", name: "square", version: "1.2.3", max_concurrent: 4,
                                   input_event_types: ["number"], output_event_types: ["squared"])
      msgs = %w[4 2].map { |p| Flowctl::Processor::DataMessage.new(payload: p, metadata: { "id" => "m#{p}" }) }
      replies = []
      seed.process(msgs) { |r| replies << r }
      expect(replies.map(&:payload)).to eq(%w[16 4 4])
      expect(replies.first.metadata).to include("id" => "m4", "type" => "squared")
      expect(client(V1::ProcessorClient, rt).process([event(3, payload: "3")]).map(&:payload)).to eq(["9"])
    end
  end

  describe "on the seed's control plane (protocols: [:seed])" do
    let!(:cp) { RecordingControlPlane.start(strict: true) }

    after { cp.kill }

    it "registers with endpoint and metadata, beats HEALTHY with the metrics, and STOPPING at the end" do
      rt = start(square, protocols: [:seed], control_plane: "127.0.0.1:#{cp.port}", heartbeat_interval: 0.2, id: "sq-s")
      expect(cp.wait_for(time_limit(5)) { |evs| evs.any? { |e| e["rpc"] == "processor_heartbeat" } }).to be(true)
      reg = cp.events("register_processor").first
      expect(reg).to include("id" => "sq-s", "endpoint" => "127.0.0.1:#{rt.port}")
      expect(reg["metadata"]).to include("name" => "square", "version" => "1.2.3", "input_event_types" => "number",
                                         "output_event_types" => "squared", "team" => "a")
      beat = cp.events("processor_heartbeat").first
      expect(beat).to include("status" => "HEALTHY")
      expect(beat["metrics"]).to include("events_received" => 0.0, "events_failed" => 0.0, "in_flight" => 0.0)
      deadline = Time.now + time_limit(2)
      sleep 0.02 until rt.ready? || Time.now > deadline
      expect(rt.ready?).to be(true)
      rt.stop(grace: 1)
      expect(cp.wait_for(time_limit(2)) { |evs| evs.any? { |e| e["status"] == "STOPPING" } }).to be(true)
    end
  end

  describe Flowctl::Component::Source do
    let(:counter) do
      Class.new(Flowctl::Component::Source) do
        info name: "counter", version: "1.0.0", output_event_types: ["count"]
        def each_event(request)
          first = Integer(request.params.fetch("start_ledger", "1"))
          last = Integer(request.params.fetch("end_ledger", "-1"))
          from = request.resume ? Integer(request.resume_token) + 1 : first
          (from..(last.negative? ? nil : last)).each do |n|
            yield(n == 3 ? "not an event" : { id: n.to_s, type: "count", payload: n.to_s })
          end
        end
      end
    end

    it "streams what each_event yields for the request's params and resume token" do
      rt = start(counter, id: "src")
      c = client(V1::SourceClient, rt)
      events = c.stream_events(V1::StreamRequest.new(params: { "start_ledger" => "1", "end_ledger" => "5" })).to_a
      expect(events.map(&:id)).to eq(%w[1 2 4 5]) # 3 was not an event: counted as failed
      expect(events.map(&:source_component_id).uniq).to eq(["src"])
      expect(rt.metrics.to_numbers).to include("events_emitted" => 4, "events_failed" => 1)
      resumed = c.stream_events(V1::StreamRequest.new(params: { "end_ledger" => "7" }, resume: true, resume_token: "5"))
      expect(resumed.map(&:id)).to eq(%w[6 7])
    end

    it "is slowed by a slow reader: what it has sent ahead of the reader stays bounded" do
      endless = Class.new(Flowctl::Component::Source) do
        def each_event(_request) = (1..).each { |n| yield V1::Event.new(id: n.to_s, payload: "x" * 1024) }
      end
      rt = start(endless)
      read = 0
      slow = true
      # no BDP probing: the reader's HTTP/2 window stays at its initial size instead of growing with
      # what a loopback link could carry, so what is measured is the gem's own buffering
      slow_client = V1::SourceClient.new("127.0.0.1:#{rt.port}", tls: false,
                                                                 channel_args: { "grpc.http2.bdp_probe" => 0 })
      clients << slow_client
      reader = Thread.new do
        slow_client.stream_events(V1::StreamRequest.new) do
          read += 1
          sleep 0.005 if slow
        end
      rescue Flowctl::RPCError
        nil
      end
      # unbounded, the source would be hundreds of thousands of events ahead within seconds
      aheads = Array.new(12) do
        sleep 0.25
        rt.metrics.to_numbers["events_emitted"] - read
      end
      # the 64 KiB window, the stream's read-ahead and send queue: about 200 events measured; 2 MB at most
      expect(aheads.max).to be < 2_048
      expect(read).to be > 0
      slow = false
      rt.stop(grace: 1)
      reader.join
    end

    it "keeps state through SaveState and GetState" do
      rt = start(counter)
      c = client(V1::SourceClient, rt)
      expect(c.get_state(key: "k").to_h).to include(state: {}, resume_token: "", last_updated_unix: 0)
      c.save_state(key: "k", state: { "resume_token" => "42", "cursor" => "x" })
      st = c.get_state(key: "k")
      expect(st.state).to eq("resume_token" => "42", "cursor" => "x")
      expect(st.resume_token).to eq("42")
      expect(st.last_updated_unix).to be_within(5).of(Time.now.to_i)
    end

    it "ends an endless stream at shutdown with UNAVAILABLE, every event sent before it in order" do
      rt = start(counter)
      c = client(V1::SourceClient, rt)
      got = []
      reader = Thread.new do
        c.stream_events(V1::StreamRequest.new) { |e| got << Integer(e.id) }
      rescue Flowctl::RPCError => e
        e
      end
      sleep 0.1 until got.size > 100
      rt.stop(grace: time_limit(3))
      expect(reader.value).to be_a(Flowctl::Unavailable)
      expect(got).to eq((1..).lazy.reject { |n| n == 3 }.first(got.size))
      expect(rt.metrics.to_numbers["events_emitted"]).to be >= got.size
    end
  end

  describe Flowctl::Component::Consumer do
    let(:sink) do
      Class.new(Flowctl::Component::Consumer) do
        info name: "sink", version: "1.0.0", input_event_types: ["squared"]
        attr_reader :seen

        def consume(event)
          raise ArgumentError, "odd one" if event.payload == "odd"

          (@seen ||= []) << event.id
        end
      end
    end

    it "consumes every event and answers what it consumed and what failed" do
      rt = start(sink)
      c = client(V1::ConsumerClient, rt)
      reply = c.consume([event(1), event(2, payload: "odd"), event(3)])
      expect(reply.to_h).to include(events_consumed: 2, events_failed: 1)
      expect(reply.errors).to eq(["event 2: ArgumentError: odd one"])
      expect(rt.component.seen).to eq(%w[1 3])
    end
  end

  it "ends streams that wait for their next event at once at shutdown (their calls are cancelled), not after the grace" do
    rt = start(square)
    sink_rt = start(Class.new(Flowctl::Component::Consumer) { def consume(_event) = nil })
    calls = [client(V1::ProcessorClient, rt).process_stream, client(V1::ConsumerClient, sink_rt).consume_stream]
    calls.each { |c| c.write(event(3)) }
    expect(calls.first.read.payload).to eq("9")
    Timeout.timeout(time_limit(10)) { sleep 0.01 until sink_rt.metrics.to_numbers["events_received"] == 1 }
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    [rt, sink_rt].map { |r| Thread.new { r.stop(grace: 20) } }.each(&:join)
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0).to be < time_limit(5)
    expect { calls.first.read }.to raise_error(Flowctl::RPCError)
    expect { calls.last.response }.to raise_error(Flowctl::RPCError)
    expect(rt.metrics.to_numbers).to include("events_received" => 1, "events_emitted" => 1, "events_dropped" => 0)
    calls.each(&:cancel)
  end

  it "answers grpc.health.v1 Check to the official grpc gem's health stub" do
    rt = start(square)
    script = <<~'RUBY'
      require "grpc"
      require "grpc/health/v1/health_services_pb"
      stub = Grpc::Health::V1::Health::Stub.new("127.0.0.1:#{ARGV[0]}", :this_channel_is_insecure)
      ["", "flowctl.v1.ProcessorService", "nope"].each do |name|
        puts stub.check(Grpc::Health::V1::HealthCheckRequest.new(service: name)).status
      rescue GRPC::BadStatus => e
        puts "error #{e.code}"
      end
    RUBY
    out, err, st = Open3.capture3(RbConfig.ruby, "-e", script, rt.port.to_s)
    expect(st.success?).to be(true), err
    expect(out.split).to eq(%w[SERVING SERVING error 5])
  end
end

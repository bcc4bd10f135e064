# frozen_string_literal: true

require "spec_helper"

# The rules both protocols share: janitor, limits, metrics merge, the printed table.
RSpec.describe "Flowctl::ControlPlane::Registry store" do
  CPS = Flowctl::ControlPlane

  let(:clock) { Struct.new(:now) { def call = now }.new(Time.at(1_700_000_000)) }
  let(:registry) { CPS::Registry.new(ttl: 30, janitor_interval: nil, clock: clock) }

  def register(id, registry: self.registry, **fields)
    registry.register_processor(CPS::RegisterProcessorRequest.new(processor_id: id, **fields))
  end

  def beat(id, registry: self.registry, **fields)
    registry.processor_heartbeat(CPS::ProcessorHeartbeatRequest.new(processor_id: id, **fields))
  end

  describe "the janitor" do
    it "marks HEALTHY components past the TTL UNHEALTHY, and nothing else; a later status brings them back" do
      %w[healthy degraded starting fresh].each { |id| register(id) }
      beat("healthy", status: "HEALTHY")
      beat("degraded", status: "DEGRADED")
      clock.now += 29
      beat("fresh", status: "HEALTHY")
      expect(registry.sweep).to eq([])
      clock.now += 2
      expect(registry.sweep).to eq(["healthy"])
      statuses = registry.components.to_h { |c| [c.id, c.status] }
      expect(statuses).to eq("healthy" => "UNHEALTHY", "degraded" => "DEGRADED", "starting" => "STARTING", "fresh" => "HEALTHY")
      beat("healthy") # no status: stays UNHEALTHY
      expect(registry.component("healthy").status).to eq("UNHEALTHY")
      beat("healthy", status: "HEALTHY")
      expect(registry.component("healthy").status).to eq("HEALTHY")
      expect(registry.size).to eq(4) # nothing is removed
    end

    it "runs every janitor_interval on its own thread, and close ends it" do
      r = CPS::Registry.new(ttl: 0.05, janitor_interval: 0.02)
      register("p", registry: r)
      beat("p", registry: r, status: "HEALTHY")
      deadline = Time.now + time_limit(5)
      sleep 0.01 until r.component("p").status == "UNHEALTHY" || Time.now > deadline
      expect(r.component("p").status).to eq("UNHEALTHY")
      janitor = r.instance_variable_get(:@janitor)
      expect(janitor.alive?).to be(true)
      r.close
      expect(janitor.alive?).to be(false)
    end

    it "refuses intervals that are not positive numbers" do
      expect { CPS::Registry.new(janitor_interval: 0) }.to raise_error(ArgumentError, /janitor_interval/)
      expect { CPS::Registry.new(ttl: -1) }.to raise_error(ArgumentError, /ttl/)
      expect { CPS::Registry.new(flush_interval: Float::NAN) }.to raise_error(ArgumentError, /flush_interval/)
    end
  end

  describe "metrics" do
    it "merge key by key: keys are never removed" do
      register("p")
      beat("p", metrics: { "a" => 1.0, "b" => 2.0 })
      beat("p", metrics: { "b" => 3.0, "c" => Float::NAN })
      m = registry.component("p").metrics
      expect(m.keys).to eq(%w[a b c])
      expect(m.values_at("a", "b")).to eq([1.0, 3.0])
      expect(m["c"]).to be_nan
    end
  end

  describe "limits" do
    let(:small) do
      CPS::Registry.new(janitor_interval: nil, limits: { max_components: 3, max_registration_bytes: 200, max_metrics: 2,
                                                         max_metric_bytes: 40 })
    end

    it "refuses a new id past max_components with RESOURCE_EXHAUSTED, and still takes known ids" do
      3.times { |i| register("p#{i}", registry: small) }
      expect { register("p3", registry: small) }.to raise_error(Flowctl::ResourceExhausted, /3 components registered \(limit 3\)/)
      expect(register("p1", registry: small, endpoint: "new:1").success).to be(true)
      small.remove("p0")
      expect(register("p3", registry: small).success).to be(true)
      expect(small.size).to eq(3)
    end

    it "refuses an oversized registration with INVALID_ARGUMENT" do
      expect { register("p", registry: small, metadata: { "k" => "v" * 300 }) }
        .to raise_error(Flowctl::InvalidArgument, /registration too large: \d+ bytes .* \(limit 200\)/)
      expect(small.size).to eq(0)
    end

    it "bounds metric keys and sizes, changing nothing of a refused heartbeat" do
      register("p", registry: small)
      beat("p", registry: small, metrics: { "a" => 1.0, "b" => 1.0 })
      expect { beat("p", registry: small, metrics: { "a" => 5.0, "c" => 1.0 }) }
        .to raise_error(Flowctl::ResourceExhausted, /too many metrics for p: 3 keys \(limit 2/)
      expect { beat("p", registry: small, metrics: { "k" * 40 => 1.0 }) }.to raise_error(Flowctl::InvalidArgument, /too large/)
      expect(small.component("p").metrics).to eq("a" => 1.0, "b" => 1.0)
      expect(small.component("p").heartbeats).to eq(1)
    end

    it "bounds the bytes held (max_bytes) across components" do
      r = CPS::Registry.new(janitor_interval: nil, limits: { max_bytes: 1000 })
      i = 0
      expect do
        loop { register("p#{i += 1}", registry: r, endpoint: "e" * 90) }
      end.to raise_error(Flowctl::ResourceExhausted, /bytes held \(limit 1000\)/)
      expect(r.size).to be_between(9, 10)
      r.remove("p1")
      expect(register("again", registry: r, endpoint: "e" * 90).success).to be(true)
    end

    it "refuses unknown or non-positive limits" do
      expect { CPS::Registry.new(limits: { max_things: 1 }) }.to raise_error(ArgumentError, /unknown limit :max_things/)
      expect { CPS::Registry.new(limits: { max_components: 0 }) }.to raise_error(ArgumentError, /positive Integer/)
    end

    it "stays within max_components under a flood of unique ids from many threads" do
      per, cap = ENV["GC_STRESS"] ? [15, 25] : [300, 500] # every allocation is a full GC under GC_STRESS
      r = CPS::Registry.new(janitor_interval: nil, limits: { max_components: cap })
      refused = Queue.new
      threads = 4.times.map do |t|
        Thread.new do
          per.times do |i|
            register("t#{t}-#{i}", registry: r)
          rescue Flowctl::ResourceExhausted
            refused << 1
          end
        end
      end
      threads.each(&:join)
      expect(r.size).to eq(cap)
      expect(refused.size).to eq(4 * per - cap)
    end
  end

  describe "the table" do
    it "escapes NUL, newlines, terminal escapes and bidi overrides, so each component is one line" do
      evil = "x\u0000y\nz\r\e[31mred\e]0;title\a\u202Eevil\u0085"
      register(evil, endpoint: "h:1\n\e[2J", metadata: { "k" => evil })
      beat(evil, status: "HEALTHY\e[0m", metrics: { "m\n" => Float::NAN, "inf" => Float::INFINITY, "ninf" => -Float::INFINITY,
                                                     "n" => 3.0, "f" => 0.25 })
      text = registry.table
      lines = text.lines
      expect(lines.size).to eq(2)
      expect(text).not_to match(/[\x00-\x09\x0b-\x1f\x7f\u0080-\u009f\u202e]/)
      expect(lines[1]).to include('x\x00y\nz\r\e[31mred\e]0;title\x07\u202Eevil\x85')
      expect(lines[1]).to include('h:1\n\e[2J', 'HEALTHY\e[0m', 'm\n=NaN', "inf=Infinity", "ninf=-Infinity", "n=3", "f=0.25")
    end

    it "cuts long cells, and shows at most `rows` components after a summary line" do
      register("a" * 200)
      5.times { |i| register("p#{i}") }
      beat("p0", status: "HEALTHY")
      expect(registry.table.lines[1]).to include("#{'a' * 45}...")
      short = registry.table(rows: 2).lines.map(&:chomp)
      expect(short.first).to eq("6 components: 5 STARTING, 1 HEALTHY; seed 6")
      expect(short.size).to eq(5)
      expect(short.last).to eq("(4 more not shown)")
      expect(registry.table(rows: 0).lines.map(&:chomp)).to eq(["6 components: 5 STARTING, 1 HEALTHY; seed 6", "(6 more not shown)"])
    end

    it "counts changes, so a display can redraw only when something moved" do
      v = registry.version
      registry.table
      expect(registry.version).to eq(v)
      register("p")
      expect(registry.version).to be > v
    end
  end
end

# Admission with the control plane's default settings (Registry#serve): a burst of 64 calls in
# flight queues instead of being refused, and a registration burst loses nothing.
RSpec.describe "Flowctl::ControlPlane::Registry#serve admission" do
  it "takes a burst of registrations and heartbeats from 64 callers at once without refusing any" do
    registry = Flowctl::ControlPlane::Registry.new(janitor_interval: nil)
    server = registry.serve(port: 0)
    per = ENV["GC_STRESS"] ? 1 : 20 # every allocation is a full GC under GC_STRESS
    clients = Array.new(4) { Flowctl::ControlPlane::Client.new("127.0.0.1:#{server.port}", tls: false, timeout: time_limit(30)) }
    errors = Queue.new
    threads = Array.new(64) do |t|
      Thread.new do
        c = clients[t % 4]
        per.times do |i|
          c.register_processor(processor_id: "p#{t}-#{i}", endpoint: "h:#{i}")
          errors << "p#{t}-#{i}" unless c.processor_heartbeat(processor_id: "p#{t}-#{i}", status: "HEALTHY").success
        rescue Flowctl::RPCError => e
          errors << e
        end
      end
    end
    threads.each(&:join)
    expect(errors.size).to eq(0), -> { Array.new(errors.size) { errors.pop }.first(3).inspect }
    expect(registry.size).to eq(64 * per)
    expect(server.stats[:rejected]).to eq(0)
  ensure
    clients&.each(&:close)
    server&.stop
    registry&.close
  end
end

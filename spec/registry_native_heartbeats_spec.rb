# frozen_string_literal: true

require "spec_helper"
require "tmpdir"

# flowctl.v1 heartbeats answered on the server's acceptor thread from the registry's native
# table (ext/flowctl/beat_table.c, Registry#native_unary): the same replies and the same
# registry as the Ruby handler gives, seen through every Ruby reader; the heartbeats that
# change anything else still go through Ruby.
RSpec.describe "Flowctl::ControlPlane::Registry native heartbeats" do
  let(:registry) { Flowctl::ControlPlane::Registry.new(janitor_interval: nil) }
  let(:server) { registry.serve(port: 0) }
  let(:cp) { Flowctl::V1::ControlPlaneClient.new("127.0.0.1:#{server.port}", tls: false, timeout: time_limit(10)) }

  after do
    cp.close
    server.stop
    registry.close
  end

  def info(id) = { id: id, type: :COMPONENT_TYPE_PROCESSOR, endpoint: "127.0.0.1:9001" }
  def native = server.stats[:answered_natively]

  def beat(id, status = :HEALTH_STATUS_HEALTHY, client: cp, **metrics)
    client.heartbeat(service_id: id, status: status, metrics: metrics.transform_keys(&:to_s))
  end

  # The outcome of a call: :ok, or [code, details].
  def outcome
    yield
    :ok
  rescue Flowctl::RPCError => e
    [e.code, e.details]
  end

  it "takes heartbeats that repeat the status in natively; metrics, times and counts show through every reader" do
    cp.register_component(component: info("p1"))
    v0 = registry.version
    t0 = Time.now
    beat("p1", events: "1", lag: "3")
    beat("p1", events: "2", lag: "3")
    beat("p1", :HEALTH_STATUS_UNKNOWN, events: "10")
    t1 = Time.now
    expect(native).to eq(3)
    expect(registry.version).to be > v0 # the display redraws

    c = registry.component("p1")
    expect([c.status, c.metrics, c.heartbeats]).to eq(["HEALTHY", { "events" => "10", "lag" => "3" }, 3])
    expect(c.last_heartbeat).to be_between(t0, t1)
    expect(c.metrics.keys).to all(be_frozen)
    expect(registry.components.map(&:metrics)).to eq([{ "events" => "10", "lag" => "3" }])
    expect(registry.table).to include("events=10 lag=3")
    s = cp.get_component_status(service_id: "p1")
    expect([s.status, s.metrics, s.last_heartbeat]).to eq([:HEALTH_STATUS_HEALTHY, { "events" => "10", "lag" => "3" }, c.last_heartbeat])
    expect(cp.list_components.components.map { |x| x.metrics["events"] }).to eq(["10"])
  end

  it "leaves a status change to Ruby (it is stored and counted as a change), and UNKNOWN keeps any status" do
    cp.register_component(component: info("p1"))
    beat("p1", :HEALTH_STATUS_DEGRADED, a: "1")
    expect(native).to eq(0)
    expect(registry.component("p1").status).to eq("DEGRADED")
    beat("p1", :HEALTH_STATUS_DEGRADED, a: "2") # the status stored now: natively
    beat("p1", :HEALTH_STATUS_UNKNOWN, a: "3")
    expect(native).to eq(2)
    v = registry.version
    beat("p1", :HEALTH_STATUS_HEALTHY)
    expect(native).to eq(2)
    expect(registry.version).to be > v
    c = registry.component("p1")
    expect([c.status, c.metrics, c.heartbeats]).to eq(["HEALTHY", { "a" => "3" }, 4])
  end

  it "answers an unknown or unregistered id as the Ruby handler does (NOT_FOUND, upstream's text)" do
    expect(outcome { beat("ghost") }).to eq([5, "service ghost not found"])
    cp.register_component(component: info("p1"))
    beat("p1", n: "1")
    cp.unregister_component(service_id: "p1")
    expect(outcome { beat("p1", n: "2") }).to eq([5, "service p1 not found"])
    expect(native).to eq(1)
    cp.register_component(component: info("p1")) # registering again empties the metrics
    beat("p1", m: "1")
    expect(registry.component("p1").metrics).to eq("m" => "1")
    expect(native).to eq(2)
  end

  it "keeps the limits: too many metrics, a metric too large, the registry full give Ruby's errors, nothing merged" do
    small = Flowctl::ControlPlane::Registry.new(janitor_interval: nil, limits: { max_metrics: 3, max_metric_bytes: 20 })
    srv = small.serve(port: 0)
    client = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:#{srv.port}", tls: false, timeout: time_limit(10))
    client.register_component(component: info("p1"))
    beat("p1", client: client, a: "1", b: "2")
    expect(outcome { beat("p1", client: client, c: "3", d: "4") })
      .to eq([8, "too many metrics for p1: 4 keys (limit 3; keys are never removed)"])
    expect(outcome { beat("p1", client: client, a: "x" * 20) }).to eq([3, "metric \"a\" too large: 21 bytes (limit 20)"])
    beat("p1", client: client, c: "3", a: "9")
    expect(small.component("p1").metrics).to eq("a" => "9", "b" => "2", "c" => "3")
    expect(srv.stats[:answered_natively]).to eq(2)

    registration = Flowctl::ControlPlane::Registry::Store.registration_bytes(
      "p1", Flowctl::ControlPlane::Registry::V1Service.info_fields(Flowctl::V1::ComponentInfo.new(**info("p1")))
    )
    full = Flowctl::ControlPlane::Registry.new(janitor_interval: nil, limits: { max_bytes: registration + 85 })
    srv2 = full.serve(port: 0)
    c2 = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:#{srv2.port}", tls: false, timeout: time_limit(10))
    c2.register_component(component: info("p1"))
    beat("p1", client: c2, k: "1")                    # 1 + 1 + 2 objects of 40 bytes: fits (room 85)
    expect(outcome { beat("p1", client: c2, j: "2") }).to match([8, /control plane full/]) # 82 more: does not
    beat("p1", client: c2, k: "123")                  # a longer value: 2 bytes more, fits
    expect(outcome { beat("p1", client: c2, k: "123456") }).to match([8, /control plane full/])
    expect(full.component("p1").metrics).to eq("k" => "123")
    expect(srv2.stats[:answered_natively]).to eq(2)
    expect(full.send(:store).bytes).to eq(registration + 84) # what the Ruby handler counts
  ensure
    [client, c2].each { |x| x&.close }
    [srv, srv2].each { |x| x&.stop }
    [small, full].each { |x| x&.close }
  end

  # The same calls against a registry with native heartbeats and one without: the same replies
  # and the same components. Raw bytes go through the official gem's stub (no encoder between).
  context "compared with the Ruby handler" do
    before(:all) { require "grpc" }

    def run_script(reg)
      srv = reg.serve(port: 0)
      client = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:#{srv.port}", tls: false, timeout: time_limit(10))
      seed = Flowctl::ControlPlane::Client.new("127.0.0.1:#{srv.port}", tls: false, timeout: time_limit(10))
      raw = GRPC::ClientStub.new("127.0.0.1:#{srv.port}", :this_channel_is_insecure, timeout: time_limit(10))
      send_raw = lambda do |bytes|
        raw.request_response("/flowctl.v1.ControlPlaneService/Heartbeat", bytes.b, ->(x) { x }, ->(x) { x })
        :ok
      rescue GRPC::BadStatus => e
        [e.code, e.details]
      end
      results = []
      client.register_component(component: info("p1"))
      client.register_component(component: info("p2"))
      seed.register_processor(processor_id: "s1", metadata: {})
      seed.processor_heartbeat(processor_id: "s1", status: "HEALTHY", metrics: { "events" => 12.0 })
      results << outcome { beat("p1", client: client, events: "1", lag: "3") }
      results << outcome { beat("s1", :HEALTH_STATUS_UNKNOWN, client: client, events: "13") } # a double becomes a String
      results << outcome { beat("s1", client: client, events: "14") }
      results << outcome { beat("p2", :HEALTH_STATUS_STOPPING, client: client) }
      results << outcome { beat("p2", :HEALTH_STATUS_STOPPING, client: client, x: "") }
      results << outcome { beat("p1", client: client, "é" => "ü", "" => "empty key") }
      valid = "\n\x02p1\x10\x02"
      [valid, "", "\n\x02\xff\xfe", "\n\x05p1", "\x08\x01", "\n\x02p1\x1a\x07\n\x01a\x12\x02\xc3\x28",
       "#{valid}\x1a\x06\n\x01d\x12\x011\x1a\x06\n\x01d\x12\x012", "#{valid}\x48\x01", "\n\x02p9\n\x02p1\x10\x02",
       "#{valid}\x1a\x03\n\x01z", "#{valid}\x1a\x03\x12\x01y", "\n\x02p1\x10\x07", "\n\x02p1\x10#{"\xff" * 9}\x01",
       "#{valid}\x1a\x08\n\x01a\x12\x01b\x18\x01", "#{valid}\x10\x02", "\n\x02p1\x12\x00",
       "\n\x02p1\x10#{"\x82" + "\x80" * 8}\x02", "\x8a\x80\x80\x80\x80\x00\x02p1", "\x8a\x80\x80\x80\x00\x02p1\x10\x02",
       "\n\x02p1\x10\x82\x80\x00"].each do |bytes|
        results << send_raw.call(bytes)
      end
      results << outcome { beat("p1", :HEALTH_STATUS_UNKNOWN, client: client, events: "2") }
      comps = reg.components.map { |c| [c.id, c.status, c.metrics, c.heartbeats] }
      [results, comps, srv.stats[:answered_natively]]
    ensure
      client&.close
      seed&.close
      srv&.stop
    end

    it "gives the same replies (bad bytes included) and leaves the same registry" do
      fast = Flowctl::ControlPlane::Registry.new(janitor_interval: nil)
      slow = Flowctl::ControlPlane::Registry.new(janitor_interval: nil, native_heartbeats: false)
      fast_results, fast_comps, fast_native = run_script(fast)
      slow_results, slow_comps, slow_native = run_script(slow)
      expect(fast_results).to eq(slow_results)
      expect(fast_comps).to eq(slow_comps)
      expect(slow_native).to eq(0)
      # the beats that repeat the status, and the three plainly valid raw requests (a component
      # registered through the seed's protocol is published at its first flowctl.v1 heartbeat, Ruby's)
      expect(fast_native).to eq(8)
      expect(fast.send(:store).bytes).to eq(slow.send(:store).bytes)
      expect(fast_results).to include([13, a_string_matching(/cannot decode flowctl.v1.HeartbeatRequest/)])
    ensure
      fast&.close
      slow&.close
    end
  end

  it "gives the same replies as the Ruby handler to a few hundred mutated heartbeats (seeded), and the same registry" do
    rng = Random.new(20_261_202)
    base = [
      Flowctl::V1::HeartbeatRequest.new(service_id: "p1", status: :HEALTH_STATUS_HEALTHY, metrics: { "events" => "12", "lag" => "3" }),
      Flowctl::V1::HeartbeatRequest.new(service_id: "p2", metrics: { "é" => "ü" * 3 }),
      Flowctl::V1::HeartbeatRequest.new(service_id: "p1", status: :HEALTH_STATUS_DEGRADED)
    ].map(&:to_proto)
    inputs = Array.new(ENV["GC_STRESS"] == "1" ? 20 : 300) do
      b = base[rng.rand(base.size)].dup
      case rng.rand(4)
      when 0 then b.setbyte(rng.rand(b.bytesize), rng.rand(256))
      when 1 then b = b.byteslice(0, rng.rand(b.bytesize))
      when 2 then b.insert(rng.rand(b.bytesize + 1), rng.rand(256).chr)
      else b.setbyte(rng.rand(b.bytesize), b.getbyte(rng.rand(b.bytesize)) ^ (1 << rng.rand(8)))
      end
      b
    end
    results = [true, false].map do |native|
      reg = Flowctl::ControlPlane::Registry.new(janitor_interval: nil, native_heartbeats: native)
      srv = reg.serve(port: 0)
      client = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:#{srv.port}", tls: false, timeout: time_limit(10))
      %w[p1 p2].each { |id| client.register_component(component: info(id)) }
      replies = inputs.map do |bytes|
        client.heartbeat(Flowctl::V1::HeartbeatRequest.decode(bytes))
        :ok
      rescue Flowctl::DecodeError => e
        [:undecodable, e.message]
      rescue Flowctl::RPCError => e
        [e.code, e.details]
      end
      raw_replies = inputs.first(40).map { |bytes| raw_heartbeat(srv.port, bytes) }
      [replies, raw_replies, reg.components.map { |c| [c.id, c.status, c.metrics, c.heartbeats] }, srv.stats[:answered_natively]]
    ensure
      client&.close
      srv&.stop
      reg&.close
    end
    expect(results[0][0..2]).to eq(results[1][0..2])
    expect(results[0][3]).to be_positive
    expect(results[1][3]).to eq(0)
  end

  # One heartbeat's bytes as they are (the gem's client would decode and encode them first).
  def raw_heartbeat(port, bytes)
    require "grpc"
    stub = GRPC::ClientStub.new("127.0.0.1:#{port}", :this_channel_is_insecure, timeout: time_limit(10))
    stub.request_response("/flowctl.v1.ControlPlaneService/Heartbeat", bytes.b, ->(x) { x }, ->(x) { x })
    :ok
  rescue GRPC::BadStatus => e
    [e.code, e.details]
  end

  it "keeps the server's bearer token: a heartbeat without it is UNAUTHENTICATED, never taken in" do
    reg = Flowctl::ControlPlane::Registry.new(janitor_interval: nil)
    srv = reg.serve(port: 0, auth_token: "s3cret")
    good = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:#{srv.port}", tls: false, timeout: time_limit(10),
                                                headers: { "authorization" => "Bearer s3cret" })
    bad = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:#{srv.port}", tls: false, timeout: time_limit(10))
    good.register_component(component: info("p1"))
    expect(outcome { beat("p1", client: bad, n: "1") }).to match([16, /authorization/])
    beat("p1", client: good, n: "2")
    expect([srv.stats[:answered_natively], srv.stats[:unauthenticated]]).to eq([1, 1])
    expect(reg.component("p1").then { |c| [c.metrics, c.heartbeats] }).to eq([{ "n" => "2" }, 1])
  ensure
    [good, bad].each { |c| c&.close }
    srv&.stop
    reg&.close
  end

  it "is not used with interceptors, a clock of the caller's, a subclass's own #heartbeat, or native_heartbeats: false" do
    seen = []
    interceptor = Class.new(Flowctl::ServerInterceptor) do
      define_method(:request_response) do |request:, call:, method:, &blk|
        seen << method.name
        blk.call
      end
    end
    own = Class.new(Flowctl::ControlPlane::Registry) do
      def heartbeat(request, call = nil) = super.tap { (@mine ||= []) << request.service_id }
      attr_reader :mine
    end
    setups = {
      interceptors: [Flowctl::ControlPlane::Registry.new(janitor_interval: nil), { interceptors: [interceptor.new] }],
      clock: [Flowctl::ControlPlane::Registry.new(janitor_interval: nil, clock: -> { Time.now }), {}],
      subclass: [own.new(janitor_interval: nil), {}],
      off: [Flowctl::ControlPlane::Registry.new(janitor_interval: nil, native_heartbeats: false), {}]
    }
    setups.each do |name, (reg, opts)|
      srv = reg.serve(port: 0, **opts)
      client = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:#{srv.port}", tls: false, timeout: time_limit(10))
      client.register_component(component: info("p1"))
      2.times { beat("p1", client: client, n: "1") }
      expect([name, srv.stats[:answered_natively], reg.component("p1").heartbeats]).to eq([name, 0, 2])
      client.close
      srv.stop
    end
    expect(seen.count(:heartbeat)).to eq(2)
    expect(setups[:subclass][0].mine).to eq(%w[p1 p1])
  ensure
    setups&.each_value { |reg, _| reg.close }
  end

  it "the janitor sees native heartbeats: a beating component stays HEALTHY, a silent one goes UNHEALTHY and comes back through Ruby" do
    reg = Flowctl::ControlPlane::Registry.new(ttl: 0.4, janitor_interval: nil)
    srv = reg.serve(port: 0)
    client = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:#{srv.port}", tls: false, timeout: time_limit(10))
    client.register_component(component: info("busy"))
    client.register_component(component: info("quiet"))
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 0.6
    beat("busy", client: client) while Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline
    expect(reg.sweep).to eq(["quiet"])
    expect(reg.components.map { |c| [c.id, c.status] }).to eq([%w[busy HEALTHY], %w[quiet UNHEALTHY]])
    n = srv.stats[:answered_natively]
    beat("quiet", client: client) # HEALTHY again: a change, so Ruby's
    expect(srv.stats[:answered_natively]).to eq(n)
    expect(reg.component("quiet").status).to eq("HEALTHY")
    beat("quiet", client: client)
    expect(srv.stats[:answered_natively]).to eq(n + 1)
  ensure
    client&.close
    srv&.stop
    reg&.close
  end

  it "counts every heartbeat once with native and Ruby heartbeats, reads and sweeps from many threads at once" do
    ids = %w[a b c d]
    ids.each { |id| cp.register_component(component: info(id)) }
    per_thread = ENV["GC_STRESS"] == "1" || ENV["FLOWCTL_MEMCHECK"] ? 20 : 150
    statuses = %i[HEALTH_STATUS_HEALTHY HEALTH_STATUS_UNKNOWN HEALTH_STATUS_DEGRADED HEALTH_STATUS_HEALTHY]
    beaters = Array.new(4) do |t|
      Thread.new do
        client = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:#{server.port}", tls: false, timeout: time_limit(10))
        per_thread.times { |i| beat(ids[(i + t) % 4], statuses[(i * 7 + t) % 4], client: client, "t#{t}" => i.to_s) }
        client.close
      end
    end
    reader = Thread.new do
      until beaters.none?(&:alive?)
        registry.components
        registry.component("a")
        registry.sweep
        registry.table(rows: 2)
        # (not under GC.stress or valgrind: a compaction there holds every thread for seconds, and the
        # server's watchdog rightly shuts a connection when its acceptor is held that long)
        GC.compact if GC.respond_to?(:compact) && ENV["GC_STRESS"] != "1" && !ENV["FLOWCTL_MEMCHECK"]
      end
    end
    beaters.each(&:join)
    reader.join
    comps = registry.components
    expect(comps.sum(&:heartbeats)).to eq(4 * per_thread)
    expect(native).to be_positive
    expect(comps.map(&:metrics).reduce(:merge).keys.sort).to eq(%w[t0 t1 t2 t3])
    (0...4).each do |t| # each thread's last value for each id it beat
      last = (0...per_thread).to_a.reverse.group_by { |i| ids[(i + t) % 4] }.transform_values(&:first)
      last.each { |id, i| expect(registry.component(id).metrics["t#{t}"]).to eq(i.to_s) }
    end
  end

  it "with a database: a heartbeat due to be written goes through Ruby and is noted; the others are folded into what is written" do
    Dir.mktmpdir do |dir|
      path = File.join(dir, "cp.db")
      refresh = time_limit(1.0) # each heartbeat below comes well within it of the one before (GC_STRESS: 20 s)
      reg = Flowctl::ControlPlane::Registry.new(db: path, janitor_interval: nil, refresh_interval: refresh, flush_interval: 60)
      srv = reg.serve(port: 0)
      client = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:#{srv.port}", tls: false, timeout: time_limit(10))
      client.register_component(component: info("p1"))
      beat("p1", client: client, events: "1")
      expect(srv.stats[:answered_natively]).to eq(1)
      sleep refresh + 0.05
      beat("p1", client: client, events: "2") # the stored one is older than refresh_interval: written
      expect(srv.stats[:answered_natively]).to eq(1)
      beat("p1", client: client, events: "3")
      expect(srv.stats[:answered_natively]).to eq(2)
      client.close
      srv.stop
      reg.close # the last flush writes what is pending: the second heartbeat's note, with all there is then
      again = Flowctl::ControlPlane::Registry.new(db: path, janitor_interval: nil)
      expect(again.component("p1").then { |c| [c.metrics, c.heartbeats] }).to eq([{ "events" => "3" }, 3])
      again.close
    end
  end
end

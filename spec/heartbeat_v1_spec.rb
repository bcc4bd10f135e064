# frozen_string_literal: true

require_relative "spec_helper"
require "open3"

# flowctl.v1 heartbeats from the native thread against a control plane built with the
# official grpc gem that behaves like upstream's (V1ControlPlane: a subprocess).
RSpec.describe "Flowctl::Heartbeat on flowctl.v1" do
  CHANNEL_ARGS_V1 = {"grpc.initial_reconnect_backoff_ms" => 100, "grpc.max_reconnect_backoff_ms" => 500}.freeze
  COMPONENT = {name: "square", version: "1.0.0", type: :processor, endpoint: "127.0.0.1:9555",
               input_event_types: ["raw"], output_event_types: ["squared"], metadata: {"zone" => "a"}}.freeze

  CLIENT_CLASS = Flowctl::V1::ControlPlaneClient

  # The interval of most examples. Under GC_STRESS every allocation is a full GC and
  # the thread that reads the control plane's reports cannot keep up with 5 beats/s.
  BEAT = ENV["GC_STRESS"] == "1" ? 2.0 : 0.2

  let(:cp_opts) { {} }
  let!(:cp) { V1ControlPlane.start(**cp_opts) }
  let(:client) do
    CLIENT_CLASS.new("127.0.0.1:#{cp.port}", tls: false, channel_args: CHANNEL_ARGS_V1, headers: {"x-team" => "ruby"})
  end
  let(:started) { [] }

  after do
    started.each { |hb| hb.stop(0) }
    client.close
    cp.kill
  end

  def start(**opts)
    opts = {component: COMPONENT, component_id: "sq-1", interval: BEAT, env: {}}.merge(opts)
    client.start_heartbeat(**opts).tap { |hb| started << hb }
  end

  def events(rpc) = cp.events(rpc)

  def wait_count(rpc, n, timeout: 5)
    cp.wait_for(time_limit(timeout)) { |evs| evs.count { |e| e["rpc"] == rpc } >= n }
  end

  # Restarts the control plane (it forgets everything); the block sees only the events
  # of the new process.
  def restart_and_wait(timeout)
    seen = cp.events.size
    cp.restart
    cp.wait_for(timeout) { |evs| yield(evs.drop(seen)) }
  end

  it "registers the component, beats at once with an explicit status, then every interval" do
    t0 = Time.now.to_f
    hb = start(metrics: {"events" => 3, "lag_ms" => 1.5, "mode" => "fast"})
    expect(wait_count("heartbeat", 4, timeout: 5 * BEAT / 0.2)).to be(true)
    reg = events("register").first
    expect(reg).to include("service_id" => "sq-1", "component_id" => "sq-1")
    expect(reg["component"]).to eq(
      "id" => "sq-1", "name" => "square", "version" => "1.0.0", "type" => "COMPONENT_TYPE_PROCESSOR",
      "endpoint" => "127.0.0.1:9555", "inputEventTypes" => ["raw"], "outputEventTypes" => ["squared"],
      "metadata" => {"zone" => "a"}
    )
    expect(reg["headers"]).to include("x-team" => "ruby")
    beats = events("heartbeat")
    expect(beats.first["at"] - t0).to be < time_limit(0.5) # at once, not after one interval
    expect(beats.first["at"] - reg["at"]).to be < BEAT
    beats.each do |b|
      expect(b).to include("service_id" => "sq-1", "status" => "HEALTH_STATUS_HEALTHY", "ok" => true)
      expect(b["metrics"]).to eq("events" => "3", "lag_ms" => "1.5", "mode" => "fast")
    end
    gaps = beats.first(4).each_cons(2).map { |a, b| b["at"] - a["at"] }
    expect(gaps).to all(be_between(BEAT / 2, BEAT * 3))
    expect(hb.service_id).to eq("sq-1")
    expect(hb.kind).to eq(:processor)
    expect(hb.status).to eq(:HEALTH_STATUS_HEALTHY)
    expect(hb.stats).to include(failed: 0, registrations: 1, sent: be >= 3)
  end

  it "sends what #status= and #metrics= set, numbers as their exact text" do
    hb = start(status: :STARTING)
    expect(wait_count("heartbeat", 1)).to be(true)
    expect(events("heartbeat").first["status"]).to eq("HEALTH_STATUS_STARTING")
    hb.status = :degraded
    hb.metrics = {"big" => 2**70, "third" => Rational(1, 3), "f" => 0.1, "neg" => -0.0, "s" => "ok"}
    expect(hb.status).to eq(:HEALTH_STATUS_DEGRADED)
    expect(hb.metrics).to eq("big" => "1180591620717411303424", "third" => "0.3333333333333333", "f" => "0.1",
                             "neg" => "-0.0", "s" => "ok")
    expect(cp.wait_for(time_limit(3)) { |evs| evs.any? { |e| e["status"] == "HEALTH_STATUS_DEGRADED" } }).to be(true)
    beat = events("heartbeat").find { |e| e["status"] == "HEALTH_STATUS_DEGRADED" }
    expect(beat["metrics"]).to eq(hb.metrics)
    hb.status = 4
    expect(hb.status).to eq(:HEALTH_STATUS_UNHEALTHY)
  end

  it "stops with a STOPPING beat, then UnregisterComponent, within the deadline" do
    hb = start
    expect(wait_count("heartbeat", 2)).to be(true)
    t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    expect(hb.stop(1.0)).to be(true)
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t).to be < time_limit(1.5)
    expect(wait_count("unregister", 1, timeout: 2)).to be(true)
    # v1 beats carry no timestamp, and a beat that stop cancelled in flight may still be
    # handled after the final one (the server runs handlers on several threads): so the
    # order checked is the one stop guarantees, final beat before unregister
    stopping = events("heartbeat").select { |e| e["status"] == "HEALTH_STATUS_STOPPING" }
    expect(stopping.size).to eq(1)
    expect(events("unregister").first).to include("service_id" => "sq-1")
    expect(events("unregister").first["at"]).to be >= stopping.first["at"]
    expect(hb).not_to be_running
    expect(hb.stop).to be(true) # idempotent
  end

  it "bounds the final calls by a short deadline when the control plane is gone" do
    hb = start
    expect(wait_count("heartbeat", 1)).to be(true)
    cp.kill
    t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    hb.stop(0.3)
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t).to be < time_limit(2.5)
  end

  context "with a control plane that assigns its own service ids" do
    let(:cp_opts) { {prefix: "svc-"} }

    it "beats and unregisters with the service_id of the RegisterResponse" do
      hb = start
      expect(wait_count("heartbeat", 2)).to be(true)
      expect(hb.service_id).to eq("svc-sq-1")
      expect(events("heartbeat").map { |e| e["service_id"] }.uniq).to eq(["svc-sq-1"])
      expect(hb.id).to eq("sq-1")
      hb.stop
      expect(wait_count("unregister", 1, timeout: 2)).to be(true)
      expect(events("unregister").first["service_id"]).to eq("svc-sq-1")
    end
  end

  it "registers again within two intervals after each of ten restarts without persistence" do
    interval = 0.3
    hb = start(interval: interval)
    expect(wait_count("heartbeat", 1)).to be(true)
    took = 10.times.map do
      restarted = nil
      back = restart_and_wait(time_limit(5)) do |evs|
        restarted ||= Process.clock_gettime(Process::CLOCK_MONOTONIC) # the new process is listening
        evs.any? { |e| e["rpc"] == "register" } && evs.any? { |e| e["rpc"] == "heartbeat" && e["ok"] }
      end
      expect(back).to be(true)
      Process.clock_gettime(Process::CLOCK_MONOTONIC) - restarted
    end
    warn "      v1 control plane restarts survived: 10; registered and beating again after #{took.map { |t| t.round(2) }} s"
    # the first beat after a restart is answered UNKNOWN "service sq-1 not found": register again
    expect(took).to all(be < time_limit(2 * interval + 0.5))
    expect(hb.stats[:registrations]).to be >= 11
    expect(hb.stats[:last_error]).to match(/Heartbeat: 2 \(service sq-1 not found\)/).or be_nil
  end

  context "with NOT_FOUND for unknown ids" do
    let(:cp_opts) { {code: :not_found} }

    it "also registers again" do
      hb = start
      expect(wait_count("heartbeat", 1)).to be(true)
      back = restart_and_wait(time_limit(3)) do |evs|
        evs.any? { |e| e["rpc"] == "heartbeat" && !e["ok"] } && evs.any? { |e| e["rpc"] == "register" }
      end
      expect(back).to be(true)
      expect(cp.wait_for(time_limit(2)) { hb.stats[:registrations] >= 2 }).to be(true)
    end
  end

  it "reports failures to on_error with the status the control plane gave" do
    errors = Queue.new
    hb = start(on_error: ->(e) { errors << e })
    expect(wait_count("heartbeat", 1)).to be(true)
    cp.restart
    err = Thread.new { errors.pop }.join(time_limit(5))&.value
    expect(err).to be_a(Flowctl::RPCError)
    expect(err.message).to match(/not found|14|4/)
    hb.stop
  end

  it "stops, then unregisters, the heartbeat of a garbage-collected Heartbeat" do
    baseline = Flowctl::Heartbeat.live_count
    Thread.new { start && started.clear && nil }.join
    expect(wait_count("heartbeat", 1)).to be(true)
    deadline = Time.now + 5
    until Flowctl::Heartbeat.live_count == baseline || Time.now > deadline
      GC.start(full_mark: true, immediate_sweep: true)
      sleep 0.05
    end
    expect(Flowctl::Heartbeat.live_count).to eq(baseline)
    expect(wait_count("unregister", 1, timeout: 2)).to be(true)
  end

  # In a process of its own: the suite's process may hold threads of the official grpc gem
  # (earlier specs' peers) inside gRPC core, and then no child of it can use gRPC.
  V1_FORK_SCRIPT = <<~'RUBY'
    require "flowctl"
    port, component = Integer(ARGV[0]), Marshal.load(ARGV[1].unpack1("m"))
    client = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:#{port}", tls: false)
    hb = client.start_heartbeat(component: component, component_id: "sq-1", interval: 0.1, env: {})
    sleep 0.05 until hb.stats[:sent] >= 1
    r, w = IO.pipe
    pid = fork do
      r.close
      child = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:#{port}", tls: false)
      own = child.start_heartbeat(component: component, component_id: "child-1", interval: 0.1, env: {})
      deadline = Time.now + 5
      sleep 0.05 until own.stats[:sent] >= 2 || Time.now > deadline
      w.write Marshal.dump([hb.running?, Flowctl::Heartbeat.live_count, own.stats[:sent] >= 2, hb.stop])
      own.stop
      w.close
      exit!(0)
    end
    w.close
    result = Marshal.load(r.read)
    Process.wait(pid)
    hb.stop
    print [Marshal.dump(result + [$?.success?])].pack("m0")
  RUBY

  it "leaves the heartbeat to the parent across fork; a child starts its own", if: Flowctl::Native.fork_internals? do
    out, err, status = Open3.capture3(RbConfig.ruby, "-I", FLOWCTL_LIB, "-e", V1_FORK_SCRIPT, cp.port.to_s,
                                      [Marshal.dump(COMPONENT)].pack("m0"))
    expect(status).to be_success, err
    expect(Marshal.load(out.unpack1("m"))).to eq([false, 1, true, true, true])
    expect(events("register").map { |e| e["service_id"] }).to include("sq-1", "child-1")
    expect(cp.wait_for(time_limit(2)) { |evs| evs.any? { |e| e["rpc"] == "unregister" && e["service_id"] == "child-1" } }).to be(true)
  end

  describe "arguments" do
    it "takes ids from the env contract" do
      env = {"FLOWCTL_COMPONENT_ID" => "from-env", "FLOWCTL_HEARTBEAT_INTERVAL" => "250ms"}
      hb = start(component_id: nil, component: {name: "n"}, interval: nil, env: env)
      expect([hb.id, hb.interval, hb.kind]).to eq(["from-env", 0.25, :unspecified])
      expect(wait_count("register", 1)).to be(true)
      expect(events("register").first).to include("component_id" => "from-env")
      expect(events("register").first["component"]).to include("id" => "from-env")
    end

    it "takes a Flowctl::V1::ComponentInfo as the component" do
      info = Flowctl::V1::ComponentInfo.new(id: "info-id", name: "n", type: :COMPONENT_TYPE_CONSUMER)
      hb = start(component: info, component_id: nil)
      expect([hb.id, hb.kind]).to eq(["info-id", :consumer])
      expect(wait_count("register", 1)).to be(true)
      expect(events("register").first["component"]).to include("id" => "info-id", "type" => "COMPONENT_TYPE_CONSUMER")
    end

    it "keeps a component.id that is given apart from component_id" do
      start(component: COMPONENT.merge(id: "own-id"), component_id: "sq-9")
      expect(wait_count("register", 1)).to be(true)
      expect(events("register").first).to include("service_id" => "sq-9", "component_id" => "sq-9")
      expect(events("register").first["component"]).to include("id" => "own-id")
    end

    it "rejects bad components, statuses and metrics with errors naming them" do
      expect { start(component: {nmae: "x"}) }.to raise_error(ArgumentError, /unknown field :nmae/)
      expect { start(component: {type: :sink}) }.to raise_error(ArgumentError, /ComponentType value :sink/)
      expect { start(component: {name: 5}) }.to raise_error(TypeError, /string field 'name'/)
      expect { start(component: {input_event_types: "raw"}) }.to raise_error(TypeError, /field 'input_event_types'/)
      expect { start(component: {metadata: {"k" => "\xff".b}}) }.to raise_error(ArgumentError, /UTF-8 .*'metadata'/)
      expect { start(component: "x") }.to raise_error(TypeError, /component: must be a Hash/)
      expect { start(component: {}, component_id: nil) }.to raise_error(ArgumentError, /no component id/)
      expect { start(status: :sick) }.to raise_error(ArgumentError, /unknown status :sick/)
      expect { start(status: 9) }.to raise_error(ArgumentError, /unknown status 9/)
      expect { start(metrics: {"a" => nil}) }.to raise_error(TypeError, /metric "a" must be Numeric or String \(given NilClass\)/)
      expect { start(metrics: {"a" => "x\0"}) }.to raise_error(ArgumentError, /NUL/)
      expect { start(interval: nil, env: {"FLOWCTL_HEARTBEAT_INTERVAL" => "10 s"}) }
        .to raise_error(ArgumentError, /FLOWCTL_HEARTBEAT_INTERVAL: "10 s" is not a duration/)
      expect(started).to be_empty
      hb = start
      expect { hb.metrics = {"a" => Object.new} }.to raise_error(TypeError, /metric "a"/)
      expect { hb.status = "BOGUS" }.to raise_error(ArgumentError, /BOGUS/)
    end
  end

  describe "Heartbeat.from_env" do
    def env(extra = {})
      {"ENABLE_FLOWCTL" => "true", "FLOWCTL_ENDPOINT" => "127.0.0.1:#{cp.port}", "FLOWCTL_COMPONENT_ID" => "yaml-id",
       "FLOWCTL_SERVICE_ID" => "yaml-id", "FLOWCTL_HEARTBEAT_INTERVAL" => "200ms"}.merge(extra)
    end

    it "speaks flowctl.v1 under `flowctl run` (FLOWCTL_SERVICE_ID set)" do
      expect(Flowctl::Heartbeat.protocol_from_env(env)).to eq(:v1)
      hb = Flowctl::Heartbeat.from_env(:source, env: env, component: {name: "src", output_event_types: ["raw"]},
                                                register: {endpoint: "127.0.0.1:7001"}, metrics: {"n" => 1})
      started << hb
      expect(wait_count("heartbeat", 2)).to be(true)
      reg = events("register").first
      expect(reg).to include("component_id" => "yaml-id")
      expect(reg["component"]).to include("id" => "yaml-id", "type" => "COMPONENT_TYPE_SOURCE", "endpoint" => "127.0.0.1:7001")
      expect(events("heartbeat").first).to include("status" => "HEALTH_STATUS_HEALTHY", "metrics" => {"n" => "1"})
      expect(hb.interval).to eq(0.2)
    end

    it "chooses the protocol from protocol:, FLOWCTL_PROTOCOL or FLOWCTL_SERVICE_ID" do
      p = Flowctl::Heartbeat.method(:protocol_from_env)
      expect(p.call({})).to eq(:seed)
      expect(p.call({"FLOWCTL_SERVICE_ID" => "x"})).to eq(:v1)
      expect(p.call({"FLOWCTL_SERVICE_ID" => "x", "FLOWCTL_PROTOCOL" => "seed"})).to eq(:seed)
      expect(p.call({"FLOWCTL_PROTOCOL" => "flowctl.v1"})).to eq(:v1)
      expect(p.call({}, :v1)).to eq(:v1)
      expect { p.call({"FLOWCTL_PROTOCOL" => "v2"}) }.to raise_error(ArgumentError, /unknown heartbeat protocol "v2"/)
    end
  end
end

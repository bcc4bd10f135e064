# frozen_string_literal: true

require_relative "spec_helper"

# The native heartbeat thread against a control plane built with the official grpc gem
# (RecordingControlPlane: a subprocess that reports every request it receives).
RSpec.describe "Flowctl::Heartbeat against the official grpc gem" do
  # reconnect quickly after the control plane is killed and restarted
  CHANNEL_ARGS = {"grpc.initial_reconnect_backoff_ms" => 100, "grpc.max_reconnect_backoff_ms" => 500}.freeze

  let(:strict) { false }
  let!(:cp) { RecordingControlPlane.start(strict: strict) }
  let(:channel) { Flowctl::Native::Channel.new("127.0.0.1:#{cp.port}", false, CHANNEL_ARGS) }
  let(:started) { [] }

  after do
    started.each { |hb| hb.stop(0) }
    channel.close
    cp.kill
  end

  def start(kind = :processor, **opts)
    opts = {id: "p1", interval: 0.2}.merge(opts)
    Flowctl::Heartbeat.new(channel, kind, **opts).tap { |hb| started << hb }
  end

  def beats(rpc = "processor_heartbeat")
    cp.events(rpc)
  end

  def wait_beats(n, rpc = "processor_heartbeat", timeout: 5)
    cp.wait_for(timeout) { |evs| evs.count { |e| e["rpc"] == rpc } >= n }
  end

  # the recorder reports a request a moment after it answered it
  def wait_stopping(rpc = "processor_heartbeat")
    cp.wait_for(2) { |evs| evs.any? { |e| e["rpc"] == rpc && e["status"] == "STOPPING" } }
  end

  it "sends the first beat at once, then one every interval with the current timestamp" do
    t0 = Time.now.to_f
    hb = start(interval: 0.5)
    expect(wait_beats(5)).to be(true)
    evs = beats.first(5)
    # generous bounds: this machine is shared, but "after one interval" would be >= 0.5
    expect(evs.first["at"] - t0).to be < 0.4 # at once, not after one interval
    gaps = evs.each_cons(2).map { |a, b| b["at"] - a["at"] }
    expect(gaps.sum / gaps.size).to be_within(0.1).of(0.5)
    expect(gaps).to all(be_between(0.3, 0.9))
    evs.each do |e|
      expect(e["id"]).to eq("p1")
      expect(e["status"]).to eq("HEALTHY")
      expect(e["ts"]).to be_within(0.1).of(e["at"]) # the timestamp of that beat, not of the start
    end
    # the recorder reports a beat before its reply reaches the client: allow one in flight
    expect(hb.stats).to include(sent: be >= 4, failed: 0, consecutive_failures: 0, last_error: nil, registrations: 0)
    expect(hb.stats[:last_success_at]).to be_a(Time).and(be_within(1).of(Time.now))
    expect(hb).to be_running
  end

  it "registers first when asked, with endpoint and metadata" do
    hb = start(register: {endpoint: "127.0.0.1:9999", metadata: {"version" => "1.2", "zone" => "a"}},
               metrics: {"events" => 3})
    expect(wait_beats(2)).to be(true)
    first, second = cp.events.first(2)
    expect(first).to include("rpc" => "register_processor", "id" => "p1", "endpoint" => "127.0.0.1:9999",
                             "metadata" => {"version" => "1.2", "zone" => "a"})
    expect(second).to include("rpc" => "processor_heartbeat", "metrics" => {"events" => 3.0})
    expect(second["at"] - first["at"]).to be < 0.1 # the first beat follows the registration at once
    expect(hb.stats[:registrations]).to eq(1)
  end

  {source: "source", consumer: "consumer"}.each do |kind, name|
    it "beats as a #{kind} with #{name}_id" do
      hb = start(kind, id: "#{name}-7", register: {endpoint: "e:1"})
      expect(wait_beats(2, "#{name}_heartbeat")).to be(true)
      expect(cp.events("register_#{name}").first).to include("id" => "#{name}-7", "endpoint" => "e:1")
      expect(beats("#{name}_heartbeat").first).to include("id" => "#{name}-7", "status" => "HEALTHY")
      expect(beats).to be_empty
      expect(hb.kind).to eq(kind)
    end
  end

  it "sends new metrics and status from any Ruby thread on the next beat" do
    hb = start(metrics: {"events" => 1}, status: :STARTING)
    expect(wait_beats(1)).to be(true)
    expect(beats.first).to include("status" => "STARTING", "metrics" => {"events" => 1.0})
    Thread.new do
      hb.metrics = {"events" => 42, "lag_ms" => 1.5}
      hb.status = :UNHEALTHY
    end.join
    n = beats.size
    expect(wait_beats(n + 2)).to be(true)
    expect(beats.last).to include("status" => "UNHEALTHY", "metrics" => {"events" => 42.0, "lag_ms" => 1.5})
  end

  it "never sends a torn snapshot while metrics change under it" do
    hb = start(interval: 0.01, metrics: {"a" => 0, "b" => 0})
    writers = 2.times.map do
      Thread.new { 1.upto(300) { |i| hb.metrics = {"a" => i, "b" => i} } }
    end
    writers.each(&:join)
    expect(wait_beats(10)).to be(true)
    hb.stop
    expect(wait_stopping).to be(true)
    beats.each { |e| expect(e["metrics"]["a"]).to eq(e["metrics"]["b"]) if e["metrics"].any? }
    expect(beats.last["metrics"]).to eq("a" => 300.0, "b" => 300.0)
  end

  it "sends headers with every call" do
    start(register: true, headers: {"authorization" => "Bearer t0k"})
    expect(wait_beats(1)).to be(true)
    expect(cp.events.first["headers"]).to include("authorization" => "Bearer t0k")
    expect(beats.first["headers"]).to include("authorization" => "Bearer t0k")
  end

  it "keeps beating after the channel's Ruby object is closed (the thread holds its own reference)" do
    hb = start(interval: 0.1)
    expect(wait_beats(1)).to be(true)
    channel.close
    GC.start
    n = beats.size
    expect(wait_beats(n + 3)).to be(true)
    expect(hb.stats[:consecutive_failures]).to eq(0)
  end

  it "starts from a control-plane client (start_heartbeat uses its channel)" do
    client = Flowctl::ControlPlane::Client.allocate
    ch = channel
    client.define_singleton_method(:channel) { ch }
    hb = client.start_heartbeat(:processor, id: "via-client", interval: 0.2, register: {endpoint: "x:1"})
    started << hb
    expect(hb).to be_a(Flowctl::Heartbeat)
    expect(wait_beats(1)).to be(true)
    expect(beats.first["id"]).to eq("via-client")
  end

  describe "#stop" do
    it "sends a final STOPPING beat, joins, and is idempotent" do
      hb = start(metrics: {"x" => 1})
      expect(wait_beats(2)).to be(true)
      t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      expect(hb.stop).to be(true)
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t).to be < time_limit(0.5)
      expect(wait_stopping).to be(true)
      expect(cp.last_sent("processor_heartbeat")).to include("status" => "STOPPING", "metrics" => {"x" => 1.0})
      expect(hb).not_to be_running
      expect(hb.stop).to be(true)
      n = beats.size
      sleep 0.5
      expect(beats.size).to eq(n) # no beat after stop
      expect(beats.count { |e| e["status"] == "STOPPING" }).to eq(1)
      expect(Flowctl::Heartbeat.live_count).to eq(0)
    end

    it "is bounded when the control plane is gone" do
      hb = start(interval: 0.2)
      expect(wait_beats(1)).to be(true)
      cp.kill
      sleep 0.3
      t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      hb.stop(0.3)
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t).to be < time_limit(1.0)
      expect(hb.stats[:last_error]).to match(/ProcessorHeartbeat: (14|4) /)
    end
  end

  describe "faults" do
    let(:strict) { true } # beats from components it does not know get success: false

    it "backs off while the control plane is down and registers again when it is back" do
      errors = Queue.new
      hb = start(interval: 0.3, timeout: 0.3, register: {endpoint: "e:1"},
                 on_error: ->(e) { errors << [e, Thread.current] })
      expect(wait_beats(2)).to be(true)
      cp.kill
      sleep 1.5
      st = hb.stats
      expect(st[:failed]).to be_between(2, 15) # backoff: 0.1, 0.2, 0.3 (capped at the interval) * jitter
      expect(st[:consecutive_failures]).to eq(st[:failed])
      expect(st[:last_error]).to match(/ProcessorHeartbeat: (14|4) /)
      sent = st[:sent]

      cp.start # same port, a fresh process that knows no component
      back = Time.now.to_f
      expect(cp.wait_for(5) { |evs| evs.any? { |e| e["rpc"] == "register_processor" && e["at"] > back } }).to be(true)
      again = cp.events("register_processor").last
      expect(again["at"] - back).to be < 2 * 0.3 # within two intervals
      expect(wait_beats(beats.size + 2)).to be(true)
      expect(beats.last).to include("ok" => true)
      st = hb.stats
      expect(st[:registrations]).to eq(2)
      expect(st[:sent]).to be > sent
      expect(st[:consecutive_failures]).to eq(0)

      error, thread = errors.pop(timeout: 1)
      expect(error).to be_a(Flowctl::Unavailable).or be_a(Flowctl::DeadlineExceeded)
      expect(thread).to be_a(Thread)
      expect(thread).not_to eq(Thread.main)
      rejected = []
      rejected << errors.pop until errors.empty?
      expect(rejected.map(&:first)).to include(an_instance_of(Flowctl::Error).and(having_attributes(message: /success: false/)))
    end

    it "registers a component the control plane does not know even without register:" do
      hb = start(interval: 0.2)
      expect(cp.wait_for(3) { |evs| evs.any? { |e| e["rpc"] == "register_processor" } }).to be(true)
      expect(wait_beats(3)).to be(true)
      expect(beats.first["ok"]).to be(false)
      expect(beats.last["ok"]).to be(true)
      expect(hb.stats[:registrations]).to eq(1)
    end
  end

  it "keeps retrying against an address where nothing listens, and raises nothing" do
    ch = Flowctl::Native::Channel.new("127.0.0.1:#{cp.port}", false, {})
    cp.kill
    hb = Flowctl::Heartbeat.new(ch, :processor, id: "lonely", interval: 0.5, timeout: 0.5)
    started << hb
    sleep 1.5
    st = hb.stats
    expect(st[:sent]).to eq(0)
    # each attempt waits for the connection until its deadline (the interval here), then backs off
    expect(st[:failed]).to be_between(2, 20)
    expect(st[:last_error]).to match(/ProcessorHeartbeat: (14|4) /)
    expect(st[:last_success_at]).to be_nil
    expect(hb).to be_running
    hb.stop(0.2)
    ch.close
  end

  it "stops the thread of a Heartbeat that is garbage collected" do
    baseline = Flowctl::Heartbeat.live_count
    # made in a thread that ends: no reference is left on this thread's stack, which Ruby's
    # GC scans conservatively (a stale one there kept it alive in some suite orders)
    Thread.new { Flowctl::Heartbeat.new(channel, :processor, id: "gc-me", interval: 0.1) && nil }.join
    expect(wait_beats(1)).to be(true)
    deadline = Time.now + 5
    until Flowctl::Heartbeat.live_count == baseline || Time.now > deadline
      GC.start(full_mark: true, immediate_sweep: true)
      sleep 0.05
    end
    expect(Flowctl::Heartbeat.live_count).to eq(baseline)
    expect(wait_stopping).to be(true)
    expect(cp.last_sent("processor_heartbeat")["status"]).to eq("STOPPING")
    n = beats.size
    sleep 0.3
    expect(beats.size).to eq(n)
  end

  it "survives GC.stress while beating" do
    hb = start(interval: 0.02, metrics: {"a" => 1})
    GC.stress = true
    begin
      5.times { |i| hb.metrics = {"a" => i, "b" => i * 2}; hb.stats }
    ensure
      GC.stress = false
    end
    expect(wait_beats(3)).to be(true)
    hb.stop
    expect(wait_stopping).to be(true)
    expect(cp.last_sent("processor_heartbeat")).to include("status" => "STOPPING", "metrics" => {"a" => 4.0, "b" => 8.0})
  end
end

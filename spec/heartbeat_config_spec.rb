# frozen_string_literal: true

require_relative "spec_helper"

# Argument checking, status names and the FLOWCTL_* environment: no server needed
# (the channel points at a port nothing listens on; every heartbeat is stopped).
RSpec.describe "Flowctl::Heartbeat configuration" do
  let(:channel) { Flowctl::Native::Channel.new("127.0.0.1:1", false, {}) }
  let(:started) { [] }

  after do
    started.each { |hb| hb.stop(0) }
    channel.close
  end

  def start(**opts)
    Flowctl::Heartbeat.new(channel, opts.delete(:kind) || :processor, id: "p1", interval: 5, **opts)
      .tap { |hb| started << hb }
  end

  describe "parse_interval" do
    it "accepts units and plain seconds" do
      p = Flowctl::Heartbeat.method(:parse_interval)
      expect(p.call("10s")).to eq(10.0)
      expect(p.call("500ms")).to eq(0.5)
      expect(p.call("1m")).to eq(60.0)
      expect(p.call("1h")).to eq(3600.0)
      expect(p.call("2.5")).to eq(2.5)
      expect(p.call(" 3 ")).to eq(3.0)
      expect(p.call(7)).to eq(7.0)
    end

    it "rejects what is not a positive duration, naming the variable" do
      %w[abc 10x -1s 0 0ms 1.5.2 s].each do |bad|
        expect { Flowctl::Heartbeat.parse_interval(bad, name: "FLOWCTL_HEARTBEAT_INTERVAL") }
          .to raise_error(ArgumentError, /FLOWCTL_HEARTBEAT_INTERVAL/)
      end
      expect { Flowctl::Heartbeat.parse_interval("2d") }.to raise_error(ArgumentError, /not a duration/)
      expect { Flowctl::Heartbeat.parse_interval("25h") }.to raise_error(ArgumentError, /longer than a day/)
    end
  end

  describe "Go durations (FLOWCTL_HEARTBEAT_INTERVAL as flowctl run sets it)" do
    it "reads every form Go's time.ParseDuration reads, exactly" do
      p = Flowctl::Heartbeat.method(:parse_interval)
      {"1m30s" => 90.0, "1h2m3.5s" => 3723.5, "1.5h" => 5400.0, "2h45m" => 9900.0, ".5s" => 0.5, "1.s" => 1.0,
       "250us" => 0.00025, "250\u00b5s" => 0.00025, "250\u03bcs" => 0.00025, "1500000ns" => 0.0015, "+10s" => 10.0,
       "1m0.001s" => 60.001, "100ms100ms" => 0.2}.each do |text, seconds|
        expect(p.call(text)).to eq(seconds), text
      end
      expect(Flowctl::Duration.parse("0")).to eq(0.0)
      expect(Flowctl::Duration.parse("-1m30s")).to eq(-90.0)
    end

    it "rejects what Go rejects, naming the variable" do
      ["1d", "10 s", "1m30", "--1s", "1.2.3s", "s", ".s", "1sm", "1S", "1e3s", "", " ", "0x10s", "1_000ms"].each do |bad|
        expect { Flowctl::Heartbeat.parse_interval(bad, name: "FLOWCTL_HEARTBEAT_INTERVAL") }
          .to raise_error(ArgumentError, /FLOWCTL_HEARTBEAT_INTERVAL: #{Regexp.escape(bad.inspect)} is not a duration/)
      end
      expect { Flowctl::Heartbeat.parse_interval("-1s", name: "X") }.to raise_error(ArgumentError, /X: "-1s" must be more than zero/)
      expect { Flowctl::Duration.parse(:ten) }.to raise_error(TypeError, /duration String/)
    end
  end

  describe "the plans given to the native thread" do
    # The field number a message class writes for one field (numbers below 16: one byte of key).
    def number(klass, **field) = klass.new(**field).to_proto.getbyte(0) >> 3

    it "name the seed's field numbers as its message classes have them" do
      cp = Flowctl::ControlPlane
      Flowctl::Heartbeat::Seed::PLANS.each do |kind, plan|
        k = kind.capitalize
        beat = cp.const_get(:"#{k}HeartbeatRequest")
        expect(plan.values_at(:beat_id, :beat_timestamp, :beat_metrics, :beat_status))
          .to eq([number(beat, "#{kind}_id": "x"), number(beat, timestamp: Time.now), number(beat, metrics: {"a" => 1.0}),
                  number(beat, status: "HEALTHY")])
        reply = cp.const_get(:"#{k}HeartbeatResponse")
        expect(plan.values_at(:beat_success, :beat_message)).to eq([number(reply, success: true), number(reply, message: "m")])
        reg = cp.const_get(:"Register#{k}Response")
        expect(plan.values_at(:register_success, :register_message)).to eq([number(reg, success: true), number(reg, message: "m")])
        expect(plan[:statuses].to_h).to eq(Flowctl::Common::HealthStatus.values.transform_keys(&:to_s))
        expect(plan[:statuses][plan[:stopping]].first).to eq("STOPPING")
      end
    end

    it "name flowctl.v1's field numbers as its message classes have them" do
      v1 = Flowctl::V1
      plan = v1::HeartbeatProtocol::PLAN
      expect(plan.values_at(:beat_id, :beat_status, :beat_metrics))
        .to eq([number(v1::HeartbeatRequest, service_id: "x"), number(v1::HeartbeatRequest, status: 2),
                number(v1::HeartbeatRequest, metrics: {"a" => "1"})])
      expect(plan[:register_service_id]).to eq(number(v1::RegisterResponse, service_id: "x"))
      expect(plan[:unregister_id]).to eq(number(v1::UnregisterRequest, service_id: "x"))
      expect(plan[:statuses][plan[:stopping]]).to eq(["HEALTH_STATUS_STOPPING", 5])
    end
  end

  describe "config_from_env" do
    it "is nil unless ENABLE_FLOWCTL is true" do
      expect(Flowctl::Heartbeat.config_from_env({})).to be_nil
      expect(Flowctl::Heartbeat.config_from_env({"ENABLE_FLOWCTL" => "false"})).to be_nil
      expect(Flowctl::Heartbeat.from_env(env: {"ENABLE_FLOWCTL" => "0"})).to be_nil
    end

    it "reads FLOWCTL_ENDPOINT, FLOWCTL_COMPONENT_ID and FLOWCTL_HEARTBEAT_INTERVAL" do
      env = {"ENABLE_FLOWCTL" => "true", "FLOWCTL_ENDPOINT" => "cp:9000", "FLOWCTL_COMPONENT_ID" => "ttp-1",
             "FLOWCTL_HEARTBEAT_INTERVAL" => "500ms"}
      expect(Flowctl::Heartbeat.config_from_env(env)).to eq(endpoint: "cp:9000", id: "ttp-1", interval: 0.5)
    end

    it "has defaults" do
      cfg = Flowctl::Heartbeat.config_from_env({"ENABLE_FLOWCTL" => "1"}, kind: :source)
      expect(cfg[:endpoint]).to eq("localhost:8080")
      expect(cfg[:interval]).to eq(10.0)
      expect(cfg[:id]).to eq("source-#{Socket.gethostname}-#{Process.pid}")
    end

    it "raises a clear ArgumentError on a bad interval" do
      env = {"ENABLE_FLOWCTL" => "true", "FLOWCTL_HEARTBEAT_INTERVAL" => "soon"}
      expect { Flowctl::Heartbeat.config_from_env(env) }
        .to raise_error(ArgumentError, /FLOWCTL_HEARTBEAT_INTERVAL: "soon" is not a duration/)
    end
  end

  describe "arguments" do
    it "rejects unknown kinds, empty ids and bad intervals" do
      expect { start(kind: :sink) }.to raise_error(ArgumentError, /unknown heartbeat kind :sink/)
      expect { Flowctl::Heartbeat.new(channel, :processor, id: "", interval: 1) }.to raise_error(ArgumentError, /id/)
      expect { Flowctl::Heartbeat.new(channel, :processor, id: 5, interval: 1) }.to raise_error(TypeError, /id/)
      [0, -1, Float::NAN, Float::INFINITY].each do |bad|
        expect { Flowctl::Heartbeat.new(channel, :processor, id: "x", interval: bad) }
          .to raise_error(ArgumentError, /interval/)
      end
      expect { Flowctl::Heartbeat.new(channel, :processor, id: "x", interval: "often") }
        .to raise_error(ArgumentError, /not a duration/)
      expect { Flowctl::Heartbeat.new(channel, :processor, id: "x", interval: nil) }.to raise_error(TypeError)
      expect(Flowctl::Heartbeat.live_count).to eq(0)
    end

    it "accepts an interval string" do
      expect(start(interval: "250ms").interval).to eq(0.25)
    end

    it "accepts HealthStatus names as String or Symbol and rejects others" do
      hb = start(status: :STARTING)
      expect(hb.status).to eq("STARTING")
      hb.status = "UNHEALTHY"
      expect(hb.status).to eq("UNHEALTHY")
      hb.status = :healthy
      expect(hb.status).to eq("HEALTHY")
      ["BOGUS", :sick, 2, nil, ""].each do |bad|
        expect { hb.status = bad }.to raise_error(ArgumentError, /status/)
      end
      expect(hb.status).to eq("HEALTHY")
      expect { start(status: "NOPE") }.to raise_error(ArgumentError, /unknown status "NOPE"/)
    end

    it "checks metrics: names String/Symbol in UTF-8, values Numeric" do
      hb = start(metrics: {events: 1, "lag" => 2.5})
      expect(hb.metrics).to eq("events" => 1.0, "lag" => 2.5)
      hb.metrics = {"r" => Rational(1, 2)}
      expect(hb.metrics).to eq("r" => 0.5)
      expect { hb.metrics = {"a" => "1"} }.to raise_error(TypeError, /metric "a" must be Numeric \(given String\)/)
      expect { hb.metrics = {1 => 1} }.to raise_error(TypeError, /metric name must be a String or Symbol/)
      expect { hb.metrics = {"\xff".b => 1} }.to raise_error(ArgumentError, /UTF-8/)
      expect { hb.metrics = {"a\0b" => 1} }.to raise_error(ArgumentError, /NUL/)
      expect { hb.metrics = [1] }.to raise_error(TypeError, /Hash/)
      expect(hb.metrics).to eq("r" => 0.5)
    end

    it "checks register: and headers:" do
      expect { start(register: {endpoint: "x", meta: {}}) }.to raise_error(ArgumentError, /unknown keys/)
      expect { start(register: "x") }.to raise_error(TypeError, /register/)
      expect { start(register: {metadata: {"k" => 1}}) }.to raise_error(TypeError, /metadata value/)
      expect { start(headers: {"Bad Header" => "x"}) }.to raise_error(ArgumentError, /header/)
      expect { start(on_error: 5) }.to raise_error(TypeError, /on_error/)
      expect(Flowctl::Heartbeat.live_count).to eq(0)
    end

    it "refuses a closed channel" do
      channel.close
      expect { start }.to raise_error(IOError, /closed/)
    end
  end

  it "reports kind, id, interval and timeout" do
    hb = start(kind: "consumer", interval: 2)
    expect([hb.kind, hb.id, hb.interval, hb.timeout]).to eq([:consumer, "p1", 2.0, 2.0])
    expect(start(interval: 0.01).timeout).to eq(1.0)
    expect(start(interval: 60).timeout).to eq(5.0)
    expect(start(interval: 60, timeout: 0.5).timeout).to eq(0.5)
    expect(hb.inspect).to match(/#<Flowctl::Heartbeat consumer "p1" every 2.0s running>/)
    expect(Flowctl::Heartbeat::STATUSES).to eq(%w[UNKNOWN STARTING HEALTHY UNHEALTHY STOPPING])
  end
end

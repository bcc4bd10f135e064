# frozen_string_literal: true

require_relative "spec_helper"
require "flowctl/config"
require "tmpdir"

# The component side of live configuration (LiveConfig over the gem's flowctl.ext.v1
# ConfigService) and of service discovery (Component#discover over DiscoverComponents),
# against the embedded control plane (Registry + Config::Service on one port) in this process.
RSpec.describe "Flowctl::Component live configuration and discovery" do
  # The embedded control plane; #restart serves the same SQLite file on the same port.
  let(:plane_class) do
    Class.new do
      attr_reader :registry, :config, :port

      def initialize(db)
        @db = db
      end

      def start(port = 0)
        @registry = Flowctl::ControlPlane::Registry.new(db: @db)
        @config = Flowctl::Config::Service.new(Flowctl::Config::Store.new(@db), acknowledged: lambda { |id|
          @registry.component(id)&.metrics&.fetch("config_version", nil)
        })
        @server = Flowctl::Server.new(host: "127.0.0.1", port: port, tls: false)
        @server.handle(Flowctl::V1::ControlPlaneService, @registry)
        @server.handle(Flowctl::Ext::V1::ConfigService, @config)
        @port = @server.start
        self
      end

      def endpoint = "127.0.0.1:#{@port}"

      def stop
        @config.stop
        @server.stop(grace: 0.5)
        @registry.close
        @config.store.close
      end

      def restart
        stop
        start(@port)
      end
    end
  end

  let(:multiplier) do
    Class.new(Flowctl::Component::Processor) do
      info name: "multiplier", version: "1.0.0", input_event_types: ["n"], output_event_types: ["m"]
      config :factor, Integer, default: 1, min: 1, max: 100, description: "what payloads are multiplied by"
      config :label, String, default: "x", allowed: %w[x y]
      config :tables, Array, default: [] # not live

      def seen = (@seen ||= Queue.new)

      def on_config(config, version)
        raise ArgumentError, "13 is unlucky" if config[:factor] == 13

        seen << [config[:factor], config[:label], version]
      end

      def process(event) = { id: event.id, type: "m", payload: (Integer(event.payload) * config[:factor]).to_s }
    end
  end

  let(:log_io) { StringIO.new }
  let(:started) { [] }

  around do |ex|
    Dir.mktmpdir do |dir|
      @dir = dir
      @plane = plane_class.new(File.join(dir, "cp.db")).start
      ex.run
    ensure
      started.each { |rt| rt.stop(grace: 1) }
      @plane&.stop
    end
  end

  def start(klass, id, **opts)
    klass.start(id: id, control_plane: @plane.endpoint, heartbeat_interval: 0.2, env: {}, logger: Logger.new(log_io),
                **opts).tap { |rt| started << rt }
  end

  def wait_until(seconds, what)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + time_limit(seconds)
    until yield
      raise "timed out waiting for #{what}; log:\n#{log_io.string}" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.02
    end
  end

  # What on_config saw next ([factor, label, version]); never blocks for ever.
  def next_seen(rt)
    wait_until(10, "on_config") { !rt.component.seen.empty? }
    rt.component.seen.pop
  end

  def beat(id) = @plane.registry.component(id)&.metrics || {}

  def cfg = @cfg ||= Flowctl::Config.client(@plane.endpoint)

  after { @cfg&.close }

  def multiply(rt, n)
    c = Flowctl::V1::ProcessorClient.new("127.0.0.1:#{rt.port}", tls: false)
    c.process([Flowctl::V1::Event.new(id: "e", type: "n", payload: n.to_s)]).first.payload.to_i
  ensure
    c&.close
  end

  it "declares its config as a schema with the values it runs with, applies updates through on_config, " \
     "acknowledges them in its heartbeat; the control plane refuses what does not fit" do
    rt = start(multiplier, "mul", config: { factor: 3 })
    wait_until(10, "version 1") { rt.metrics.to_numbers["config_version"] == 1 }
    v1 = cfg.get_config(component_id: "mul")
    expect(v1.values).to eq("factor" => "3", "label" => "\"x\"") # the component's values, not the defaults
    expect(@plane.config.store.schema("mul").fields.keys).to eq(%w[factor label]) # Array keys are not live
    expect(@plane.config.store.schema("mul").fields["factor"].to_h).to include(type: "integer", min: 1, max: 100)
    expect(next_seen(rt)).to eq([3, "x", 1])

    v2 = cfg.update_config(component_id: "mul", values: { "factor" => "7", "label" => "\"y\"" }, author: "spec")
    expect(next_seen(rt)).to eq([7, "y", v2.version])
    expect(rt.component.config).to include(factor: 7, label: "y", tables: [])
    expect(multiply(rt, 6)).to eq(42)
    wait_until(10, "config_version 2 in the heartbeat") { beat("mul")["config_version"] == "2" }
    expect(cfg.get_config(component_id: "mul").acknowledged_version).to eq(2)
    expect(rt.prometheus_text).to include(%(flowctl_component_config_version{component="mul"} 2))

    expect { cfg.update_config(component_id: "mul", values: { "factor" => "1000" }, merge: true) }
      .to raise_error(Flowctl::InvalidArgument, /config key "factor": 1000 is above the maximum 100/)
    expect { cfg.update_config(component_id: "mul", values: { "label" => "\"z\"" }, merge: true) }
      .to raise_error(Flowctl::InvalidArgument, /config key "label"/)
    expect(cfg.rollback_config(component_id: "mul", version: 1).version).to eq(3)
    expect(next_seen(rt)).to eq([3, "x", 3])
    wait_until(10, "config_version 3 in the heartbeat") { beat("mul")["config_version"] == "3" }
  end

  it "keeps a version its on_config refused refused, with the reason, also across a control plane restart" do
    rt = start(multiplier, "mul")
    expect(next_seen(rt)).to eq([1, "x", 1])
    calls = []
    rt.component.define_singleton_method(:on_config) do |config, version|
      calls << version
      super(config, version)
    end

    v2 = cfg.update_config(component_id: "mul", values: { "factor" => "13" }, merge: true)
    wait_until(10, "the refusal in the heartbeat") { beat("mul")["config_refused_version"] == v2.version.to_s }
    expect(beat("mul")).to include("config_version" => "1", "config_error" => "ArgumentError: 13 is unlucky")
    expect(rt.component.config[:factor]).to eq(1)
    expect(multiply(rt, 6)).to eq(6)
    expect(cfg.get_config(component_id: "mul").acknowledged_version).to eq(1)
    expect(log_io.string).to include("config version 2 refused: ArgumentError: 13 is unlucky")

    @plane.restart # the watch stream breaks; the component watches again and is sent version 2 again
    wait_until(10, "version 2 sent again") { rt.live_config.watcher.received == 3 }
    v3 = cfg.update_config(component_id: "mul", values: { "factor" => "5" }, merge: true)
    expect(next_seen(rt)).to eq([5, "x", v3.version])
    expect(calls).to eq([2, 3]) # version 2 was not tried again
    wait_until(10, "config_version 3 in the heartbeat") { beat("mul")["config_version"] == "3" }
    expect(beat("mul")).to include("config_refused_version" => "0", "config_error" => "") # the refusal is over
  end

  it "follows a control plane that lost its versions (restarted without its file) from its first version again" do
    rt = start(multiplier, "mul")
    expect(next_seen(rt)).to eq([1, "x", 1])
    cfg.update_config(component_id: "mul", values: { "factor" => "7" }, merge: true)
    expect(next_seen(rt)).to eq([7, "x", 2])
    port = @plane.port
    @plane.stop
    @cfg.close
    @cfg = nil
    @plane = plane_class.new(File.join(@dir, "empty.db")).start(port)
    expect(next_seen(rt)).to eq([7, "x", 1]) # version 1 of the new one: the values the component runs with
    expect(cfg.get_config(component_id: "mul").values).to eq("factor" => "7", "label" => "\"x\"")
    v2 = cfg.update_config(component_id: "mul", values: { "factor" => "9" }, merge: true)
    expect(next_seen(rt)).to eq([9, "x", v2.version])
    wait_until(10, "config_version 2 in the heartbeat") { beat("mul")["config_version"] == "2" }
  end

  it "checks a version against its declarations itself (a control plane that never got the schema)" do
    rt = start(multiplier, "mul", live_config: true)
    expect(next_seen(rt)).to eq([1, "x", 1])
    rt.live_config.apply({ "factor" => 2 }, 9) # what the watcher does with a version that fits
    expect(rt.component.config[:factor]).to eq(2)
    expect { rt.live_config.apply({ "factor" => 0 }, 10) }
      .to raise_error(Flowctl::InvalidArgument, /config key "factor": 0 is below the minimum 1/)
    expect { rt.live_config.apply({ "factor" => "2" }, 10) }.to raise_error(Flowctl::InvalidArgument, /"2" is not a Integer/)
    expect { rt.live_config.apply({ "nope" => 1 }, 10) }.to raise_error(Flowctl::InvalidArgument, /"nope" is not declared by mul/)
    expect(rt.component.config[:factor]).to eq(2)
  end

  it "takes no live configuration with live_config: false, or with no live keys" do
    rt = start(multiplier, "mul", live_config: false)
    plain = start(Class.new(Flowctl::Component::Consumer) { def consume(_) = nil }, "plain")
    wait_until(10, "both registered") { rt.ready? && plain.ready? }
    sleep time_limit(0.3)
    expect(rt.live_config).to be_nil
    expect(plain.live_config).to be_nil
    expect(@plane.config.store.schema("mul")).to be_nil
    expect(rt.metrics.to_numbers).not_to include("config_version")
  end

  it "refuses config declarations that do not fit their type, and values out of range at start" do
    expect { Class.new(Flowctl::Component::Processor) { config :s, String, min: 1 } }
      .to raise_error(ArgumentError, /config s: min: applies to Integer, Float and :duration keys only/)
    expect { Class.new(Flowctl::Component::Processor) { config :n, Integer, default: 0, min: 1 } }
      .to raise_error(ArgumentError, /config n default: 0 is below the minimum 1/)
    expect { multiplier.start(control_plane: false, env: { "FACTOR" => "500" }, logger: Logger.new(nil)) }
      .to raise_error(ArgumentError, /FACTOR: 500 is above the maximum 100/)
    expect { multiplier.start(control_plane: false, env: {}, config: { label: "q" }, logger: Logger.new(nil)) }
      .to raise_error(ArgumentError, /config: label: "q" is not one of "x", "y"/)
  end

  describe "#discover" do
    let(:source) do
      Class.new(Flowctl::Component::Source) do
        info name: "numbers", version: "1.0.0", output_event_types: ["n"], metadata: { "zone" => "eu" }
        def each_event(_request) = nil
      end
    end

    it "finds the components registered with its control plane by type, event types and metadata" do
      src = start(source, "numbers")
      rt = start(multiplier, "mul", live_config: false)
      wait_until(10, "both registered") { src.ready? && rt.ready? }
      found = rt.component.discover(type: :source)
      expect(found.map(&:id)).to eq(["numbers"])
      expect(found.first.endpoint).to eq("127.0.0.1:#{src.port}")
      expect(rt.component.discover(event_types: ["n"]).map(&:id).sort).to eq(%w[mul numbers])
      expect(rt.component.discover(type: :source, metadata: { "zone" => "us" })).to eq([])
      expect(src.component.discover(type: :processor, event_types: ["m"]).map(&:id)).to eq(["mul"])
      expect { rt.component.discover(type: :router) }.to raise_error(ArgumentError, /type must be one of/)
    end

    it "says so when the component runs standalone" do
      rt = multiplier.start(control_plane: false, env: {}, logger: Logger.new(nil))
      started << rt
      expect { rt.component.discover }.to raise_error(Flowctl::Error, /runs standalone \(no control plane\): nothing to discover/)
    end
  end
end

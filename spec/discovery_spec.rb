# frozen_string_literal: true

require "spec_helper"
require "flowctl/discovery"

# Service discovery over DiscoverComponents, and a component reading its inputs itself.
RSpec.describe Flowctl::Discovery do
  # A control plane that knows some components and answers DiscoverComponents as upstream does.
  class DiscoveryPlane
    attr_accessor :components, :requests

    def initialize
      @components = []
      @requests = []
    end

    def discover_components(req, _call = nil)
      @requests << req
      types = req.event_types
      list = @components.select do |c|
        (req.type == :COMPONENT_TYPE_UNSPECIFIED || c.type == req.type) &&
          (types.empty? || (types & (c.input_event_types + c.output_event_types)).any?) &&
          req.metadata_filters.all? { |k, v| c.metadata[k] == v }
      end
      Flowctl::V1::DiscoveryResponse.new(components: list)
    end
  end

  # A source serving StreamEvents: n events "<name>-i", resumable, dying once after die_after.
  class CountingSource
    attr_reader :requests

    def initialize(name, n, die_after: nil)
      @name = name
      @n = n
      @die_after = die_after
      @requests = []
    end

    def stream_events(req, _call = nil)
      @requests << req.to_h
      first = req.resume_token.empty? ? 0 : Integer(req.resume_token) + 1
      (first...@n).each do |i|
        if @die_after && i == @die_after
          @die_after = nil
          raise Flowctl::Unavailable, "going away"
        end
        yield Flowctl::V1::Event.new(id: "#{@name}-#{i}", type: "number", payload: i.to_s, metadata: { "resume_token" => i.to_s })
      end
      nil # the replies were yielded
    end
  end

  def serve(service, handler)
    server = Flowctl::Server.new(host: "127.0.0.1", port: 0, tls: false)
    server.handle(service, handler)
    @servers << server
    "127.0.0.1:#{server.start}"
  end

  around do |ex|
    @servers = []
    ex.run
  ensure
    @servers.each { |s| s.stop(grace: 0.5) }
  end

  let(:plane) { DiscoveryPlane.new }

  def info(id, type, endpoint, out: [], inp: [], meta: {})
    Flowctl::V1::ComponentInfo.new(id: id, type: type, endpoint: endpoint, output_event_types: out, input_event_types: inp,
                                   metadata: meta)
  end

  it "discovers by type, event types and metadata" do
    cp = serve(Flowctl::V1::ControlPlaneService, plane)
    plane.components = [info("a", :COMPONENT_TYPE_SOURCE, "h:1", out: ["number"], meta: { "zone" => "eu" }),
                        info("b", :COMPONENT_TYPE_SOURCE, "h:2", out: ["text"]),
                        info("p", :COMPONENT_TYPE_PROCESSOR, "h:3", inp: ["number"], out: ["squared"])]
    expect(described_class.discover(cp, type: :source).map(&:id)).to eq(%w[a b])
    expect(described_class.discover(cp, event_types: ["number"]).map(&:id)).to eq(%w[a p])
    expect(described_class.discover(cp, type: :source, metadata: { "zone" => "eu" }).map(&:id)).to eq(%w[a])
    expect(plane.requests.last.to_h).to include(type: :COMPONENT_TYPE_SOURCE, metadata_filters: { "zone" => "eu" })
    expect { described_class.discover(cp, type: :router) }.to raise_error(ArgumentError, /type must be one of/)
    expect { described_class.resolve(cp, %w[a zz], timeout: 0.3) }.to raise_error(described_class::NotFound, /within 0.3s: zz/)
  end

  it "reads the inputs a component was declared with (FLOWCTL_INPUTS), fan-in, resuming a source that broke" do
    a = CountingSource.new("a", 200, die_after: 50)
    b = CountingSource.new("b", 100)
    plane.components = [info("a", :COMPONENT_TYPE_SOURCE, serve(Flowctl::V1::SourceService, a)),
                        info("b", :COMPONENT_TYPE_SOURCE, serve(Flowctl::V1::SourceService, b))]
    cp = serve(Flowctl::V1::ControlPlaneService, plane)
    up = described_class::Upstream.from_env({ "FLOWCTL_ENDPOINT" => cp, "FLOWCTL_INPUTS" => "a,b" }, params: { "x" => "1" })
    ids = up.map(&:id)
    expect(ids.sort).to eq(((0...200).map { |i| "a-#{i}" } + (0...100).map { |i| "b-#{i}" }).sort)
    expect(a.requests.map { |r| r.values_at(:resume, :resume_token) }).to eq([[false, ""], [true, "49"]])
    expect(a.requests.first[:params]).to eq("x" => "1")
    expect(described_class::Upstream.from_env({ "FLOWCTL_INPUTS" => "" })).to be_nil
  end

  it "takes the event types, params and resume token the runner gives (FLOWCTL_INPUT_EVENT_TYPES, FLOWCTL_STREAM_PARAMS)" do
    a = CountingSource.new("a", 10)
    plane.components = [info("a", :COMPONENT_TYPE_SOURCE, serve(Flowctl::V1::SourceService, a))]
    cp = serve(Flowctl::V1::ControlPlaneService, plane)
    env = { "FLOWCTL_ENDPOINT" => cp, "FLOWCTL_INPUTS" => " a ,", "FLOWCTL_INPUT_EVENT_TYPES" => "text",
            "FLOWCTL_STREAM_PARAMS" => '{"start_ledger": 7}' }
    wait = time_limit(30) # how long an input may take to be found (GC_STRESS: much longer)
    expect(described_class::Upstream.from_env(env, timeout: wait).to_a).to eq([]) # "number" events, filtered out
    expect(a.requests.last[:params]).to eq("start_ledger" => "7")
    up = described_class::Upstream.from_env(env.merge("FLOWCTL_INPUT_EVENT_TYPES" => "number"), resume_token: "6", timeout: wait)
    expect(up.map(&:id)).to eq(%w[a-7 a-8 a-9])
    expect(a.requests.last.values_at(:resume, :resume_token)).to eq([true, "6"])
    expect { described_class::Upstream.from_env(env.merge("FLOWCTL_STREAM_PARAMS" => "[1]")) }
      .to raise_error(ArgumentError, /FLOWCTL_STREAM_PARAMS must be a JSON object/)
    expect { described_class::Upstream.from_env(env.merge("FLOWCTL_STREAM_PARAMS" => "{x")) }
      .to raise_error(ArgumentError, /FLOWCTL_STREAM_PARAMS is not JSON/)
  end

  it "serves a self-wiring processor's outputs as a source (Relay): its readers' params and resume token go upstream" do
    a = CountingSource.new("a", 6)
    plane.components = [info("a", :COMPONENT_TYPE_SOURCE, serve(Flowctl::V1::SourceService, a))]
    cp = serve(Flowctl::V1::ControlPlaneService, plane)
    wait = time_limit(30)
    relay = described_class::Relay.from_env({ "FLOWCTL_ENDPOINT" => cp, "FLOWCTL_INPUTS" => "a" }, timeout: wait,
                                            info: { id: "p", type: :COMPONENT_TYPE_PROCESSOR }) do |e|
      i = Integer(e.payload)
      next nil if i == 3 # nothing for this one

      out = Flowctl::V1::Event.new(id: e.id, type: "squared", payload: (i * i).to_s, metadata: e.metadata)
      i == 5 ? [out, out.dup.tap { |o| o.id = "extra" }] : out
    end
    plane.components << info("p", :COMPONENT_TYPE_PROCESSOR, serve(Flowctl::V1::SourceService, relay))
    got = described_class::Upstream.new(cp, %w[p], params: { "k" => "v" }, timeout: wait).map { |e| [e.id, e.payload] }
    expect(got).to eq([%w[a-0 0], %w[a-1 1], %w[a-2 4], %w[a-4 16], %w[a-5 25], %w[extra 25]])
    expect(a.requests.last).to include(params: { "k" => "v" }, resume: false)
    expect(described_class::Upstream.new(cp, %w[p], resume_token: "3", timeout: wait).map(&:id)).to eq(%w[a-4 a-5 extra])
    expect(a.requests.last.values_at(:resume, :resume_token)).to eq([true, "3"])
    client = Flowctl::Pipeline::Wire.client(:SourceClient, plane.components.last.endpoint)
    expect(client.get_info.id).to eq("p")
    client.close
    expect(described_class::Relay.from_env({ "FLOWCTL_INPUTS" => "" }) { nil }).to be_nil
    expect { described_class::Relay.new(cp, %w[a]) }.to raise_error(ArgumentError, /Relay needs a block/)
  end
end

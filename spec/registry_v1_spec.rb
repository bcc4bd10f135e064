# frozen_string_literal: true

require "spec_helper"

# flowctl.v1's ControlPlaneService on the embedded control plane (FLOWCTL_V1.md): every RPC and
# rule, through this gem's client and through the official grpc gem's stub (OfficialFlowctl::V1,
# spec/gen/official_v1), plus both protocols over one set of components.
RSpec.describe "Flowctl::ControlPlane::Registry serving flowctl.v1" do
  CPV = Flowctl::ControlPlane
  RegistryV1Client = defined?(Flowctl::V1::ControlPlaneClient) ? Flowctl::V1::ControlPlaneClient : Class.new(Flowctl::Client) { use_service Flowctl::V1::ControlPlaneService }

  # A status a call ended with, whichever gem made it.
  RegistryFailed = Struct.new(:code, :details)

  # The same calls through either gem; replies as Hashes with Times (Message#to_h).
  class RegistryGemClient
    def initialize(port, timeout) = @c = RegistryV1Client.new("127.0.0.1:#{port}", tls: false, timeout: timeout)

    def call(rpc, **fields)
      @c.public_send(rpc, **fields).to_h
    rescue Flowctl::RPCError => e
      RegistryFailed.new(e.code, e.details)
    end

    def close = @c.close
  end

  class RegistryOfficialClient
    def initialize(port, timeout)
      @stub = OfficialFlowctl::V1::ControlPlaneService::Stub.new("127.0.0.1:#{port}", :this_channel_is_insecure, timeout: timeout)
    end

    def call(rpc, **fields)
      request = OfficialFlowctl::V1::ControlPlaneService::Service.rpc_descs[rpc.to_s.split("_").map(&:capitalize).join.to_sym].input
      RegistryOfficialClient.times(@stub.public_send(rpc, request.new(**fields)).to_h)
    rescue GRPC::BadStatus => e
      RegistryFailed.new(e.code, e.details)
    end

    def close = nil

    def self.times(value)
      case value
      when Hash
        return Time.at(value[:seconds], value[:nanos], :nsec) if value.keys.sort == %i[nanos seconds]

        value.transform_values { |v| times(v) }
      when Array then value.map { |v| times(v) }
      else value
      end
    end
  end

  before(:all) do
    $LOAD_PATH.unshift(File.expand_path("gen/official_v1", __dir__))
    require "grpc"
    require "official_flowctl/v1/control_plane_services_pb"
  end

  let(:clock) { Struct.new(:now) { def call = now }.new(Time.at(1_700_000_000, 123_456_789, :nsec)) }
  let(:registry) { CPV::Registry.new(ttl: 30, janitor_interval: nil, clock: clock) }
  let(:server) { registry.serve(port: 0) }
  after do
    @client&.close
    server.stop
    registry.close
  end

  def processor(id, **more)
    { id: id, name: "square", description: "", version: "1.0.0", type: :COMPONENT_TYPE_PROCESSOR, input_event_types: ["raw"],
      output_event_types: ["squared"], endpoint: "127.0.0.1:9001", metadata: { "zone" => "a" } }.merge(more)
  end

  { "this gem's client" => RegistryGemClient, "the official grpc gem's stub" => RegistryOfficialClient }.each do |name, klass|
    context "through #{name}" do
      let(:cp) { @client = klass.new(server.port, time_limit(10)) }

      it "RegisterComponent: service_id from component_id, else component.id, else <type>-<unix nanos>; topics; connection_info" do
        r = cp.call(:register_component, component: processor("p1"), component_id: "from-env")
        expect(r).to eq(service_id: "from-env", assigned_topics: ["squared.v1"],
                         connection_info: { "control_plane_endpoint" => "127.0.0.1:#{server.port}" })
        expect(cp.call(:register_component, component: processor("p1"))[:service_id]).to eq("p1")
        t0 = Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond)
        anon = cp.call(:register_component, component: processor("", type: :COMPONENT_TYPE_SOURCE, output_event_types: %w[a b]))
        expect(anon[:service_id]).to match(/\ACOMPONENT_TYPE_SOURCE-(\d+)\z/)
        expect(Integer(anon[:service_id][/\d+\z/])).to be >= t0
        expect(anon[:assigned_topics]).to eq(%w[a.v1 b.v1])
        consumer = cp.call(:register_component, component: processor("c1", type: :COMPONENT_TYPE_CONSUMER))
        expect(consumer[:assigned_topics]).to eq([]) # only sources and processors get topics
        # the ComponentInfo is kept as sent: its id stays what the component said
        listed = cp.call(:get_component_status, service_id: "from-env")[:component]
        expect(listed).to eq(processor("p1"))
      end

      it "RegisterComponent without a component is INVALID_ARGUMENT, and the control plane keeps serving" do
        expect(cp.call(:register_component, component_id: "x")).to eq(RegistryFailed.new(3, "RegisterComponent needs a component (RegisterRequest.component is not set)"))
        expect(cp.call(:register_component, component: processor("ok"))[:service_id]).to eq("ok")
      end

      it "registering an id again overwrites it: HEALTHY, metrics emptied, registered_at = last_heartbeat = now" do
        cp.call(:register_component, component: processor("p1"))
        cp.call(:heartbeat, service_id: "p1", status: :HEALTH_STATUS_DEGRADED, metrics: { "n" => "1" })
        clock.now += 10
        cp.call(:register_component, component: processor("p1", version: "2.0.0"))
        s = cp.call(:get_component_status, service_id: "p1")
        expect(s.values_at(:status, :metrics, :registered_at, :last_heartbeat)).to eq([:HEALTH_STATUS_HEALTHY, {}, clock.now, clock.now])
        expect(s[:component][:version]).to eq("2.0.0")
      end

      it "Heartbeat: UNKNOWN keeps the status, any other is stored; metrics merge key by key; the time is the server's" do
        cp.call(:register_component, component: processor("p1"))
        clock.now += 5
        expect(cp.call(:heartbeat, service_id: "p1", status: :HEALTH_STATUS_DEGRADED, metrics: { "a" => "1", "b" => "2" })).to eq({})
        cp.call(:heartbeat, service_id: "p1", status: :HEALTH_STATUS_UNKNOWN, metrics: { "b" => "3" })
        s = cp.call(:get_component_status, service_id: "p1")
        expect(s.values_at(:status, :metrics, :last_heartbeat)).to eq([:HEALTH_STATUS_DEGRADED, { "a" => "1", "b" => "3" }, clock.now])
        expect(s[:registered_at]).to eq(clock.now - 5)
        %i[HEALTH_STATUS_STARTING HEALTH_STATUS_UNHEALTHY HEALTH_STATUS_STOPPING HEALTH_STATUS_HEALTHY].each do |st|
          cp.call(:heartbeat, service_id: "p1", status: st)
          expect(cp.call(:get_component_status, service_id: "p1")[:status]).to eq(st)
        end
      end

      it "an unknown id is NOT_FOUND with upstream's text, for Heartbeat and GetComponentStatus" do
        expect(cp.call(:heartbeat, service_id: "ghost", status: :HEALTH_STATUS_HEALTHY)).to eq(RegistryFailed.new(5, "service ghost not found"))
        expect(cp.call(:get_component_status, service_id: "ghost")).to eq(RegistryFailed.new(5, "service ghost not found"))
        expect(registry.size).to eq(0)
      end

      it "UnregisterComponent forgets a component, and succeeds for unknown ids too" do
        cp.call(:register_component, component: processor("p1"))
        expect(cp.call(:unregister_component, service_id: "p1")).to eq({})
        expect(cp.call(:unregister_component, service_id: "p1")).to eq({})
        expect(cp.call(:heartbeat, service_id: "p1", status: :HEALTH_STATUS_HEALTHY)).to eq(RegistryFailed.new(5, "service p1 not found"))
      end

      it "ListComponents: HEALTHY only unless include_unhealthy; type_filter (UNSPECIFIED: any)" do
        cp.call(:register_component, component: processor("p1"))
        cp.call(:register_component, component: processor("s1", type: :COMPONENT_TYPE_SOURCE))
        cp.call(:register_component, component: processor("d1"))
        cp.call(:heartbeat, service_id: "d1", status: :HEALTH_STATUS_DEGRADED)
        ids = ->(**req) { cp.call(:list_components, **req)[:components].map { |c| c[:component][:id] }.sort }
        expect(ids.call).to eq(%w[p1 s1])
        expect(ids.call(include_unhealthy: true)).to eq(%w[d1 p1 s1])
        expect(ids.call(type_filter: :COMPONENT_TYPE_PROCESSOR)).to eq(%w[p1])
        expect(ids.call(type_filter: :COMPONENT_TYPE_PROCESSOR, include_unhealthy: true)).to eq(%w[d1 p1])
        expect(ids.call(type_filter: :COMPONENT_TYPE_CONSUMER)).to eq([])
      end

      it "the janitor makes a silent HEALTHY component UNHEALTHY (HEALTHY only), which ListComponents then leaves out" do
        cp.call(:register_component, component: processor("quiet"))
        cp.call(:register_component, component: processor("busy"))
        cp.call(:register_component, component: processor("degraded"))
        cp.call(:heartbeat, service_id: "degraded", status: :HEALTH_STATUS_DEGRADED)
        clock.now += 31
        cp.call(:heartbeat, service_id: "busy", status: :HEALTH_STATUS_UNKNOWN)
        registry.sweep
        statuses = cp.call(:list_components, include_unhealthy: true)[:components].to_h { |c| [c[:component][:id], c[:status]] }
        expect(statuses).to eq("quiet" => :HEALTH_STATUS_UNHEALTHY, "busy" => :HEALTH_STATUS_HEALTHY, "degraded" => :HEALTH_STATUS_DEGRADED)
        expect(cp.call(:list_components)[:components].map { |c| c[:component][:id] }).to eq(["busy"])
        cp.call(:heartbeat, service_id: "quiet", status: :HEALTH_STATUS_HEALTHY)
        expect(cp.call(:get_component_status, service_id: "quiet")[:status]).to eq(:HEALTH_STATUS_HEALTHY)
      end

      it "DiscoverComponents ignores health and filters by type, event types (any, input or output) and metadata (all)" do
        cp.call(:register_component, component: processor("p1", metadata: { "zone" => "a", "tier" => "gold" }))
        cp.call(:register_component, component: processor("s1", type: :COMPONENT_TYPE_SOURCE, input_event_types: [],
                                                                 output_event_types: ["raw"], metadata: { "zone" => "b" }))
        cp.call(:heartbeat, service_id: "s1", status: :HEALTH_STATUS_UNHEALTHY)
        ids = ->(**req) { cp.call(:discover_components, **req)[:components].map { |c| c[:id] }.sort }
        expect(ids.call).to eq(%w[p1 s1])
        expect(ids.call(type: :COMPONENT_TYPE_SOURCE)).to eq(%w[s1])
        expect(ids.call(event_types: ["raw"])).to eq(%w[p1 s1])
        expect(ids.call(event_types: %w[nothing squared])).to eq(%w[p1])
        expect(ids.call(event_types: ["nothing"])).to eq([])
        expect(ids.call(metadata_filters: { "zone" => "a" })).to eq(%w[p1])
        expect(ids.call(metadata_filters: { "zone" => "a", "tier" => "silver" })).to eq([])
        expect(ids.call(type: :COMPONENT_TYPE_PROCESSOR, event_types: ["raw"], metadata_filters: { "tier" => "gold" })).to eq(%w[p1])
        expect(cp.call(:discover_components, type: :COMPONENT_TYPE_SOURCE)[:components].first)
          .to eq(processor("s1", type: :COMPONENT_TYPE_SOURCE, input_event_types: [], output_event_types: ["raw"], metadata: { "zone" => "b" }))
      end

      it "lists components registered through the seed's protocol, and takes their v1 heartbeats" do
        seed = CPV::Client.new("127.0.0.1:#{server.port}", tls: false, timeout: time_limit(10))
        seed.register_processor(processor_id: "old-style", endpoint: "10.0.0.9:7000", metadata: { "zone" => "c" })
        seed.processor_heartbeat(processor_id: "old-style", status: "HEALTHY", metrics: { "events" => 12.0, "lag" => 0.25 })
        s = cp.call(:get_component_status, service_id: "old-style")
        expect(s[:component]).to eq(id: "old-style", name: "", description: "", version: "", type: :COMPONENT_TYPE_PROCESSOR,
                                    input_event_types: [], output_event_types: [], endpoint: "10.0.0.9:7000", metadata: { "zone" => "c" })
        expect(s.values_at(:status, :metrics)).to eq([:HEALTH_STATUS_HEALTHY, { "events" => "12", "lag" => "0.25" }])
        expect(cp.call(:list_components)[:components].map { |c| c[:component][:id] }).to eq(["old-style"])
        cp.call(:heartbeat, service_id: "old-style", status: :HEALTH_STATUS_DEGRADED, metrics: { "v1" => "yes" })
        c = registry.component("old-style")
        expect([c.status, c.metrics]).to eq(["DEGRADED", { "events" => 12.0, "lag" => 0.25, "v1" => "yes" }])
        # and the other way round: a v1 processor takes the seed's heartbeats
        cp.call(:register_component, component: processor("new-style"))
        expect(seed.processor_heartbeat(processor_id: "new-style", status: "STOPPING").success).to be(true)
        expect(seed.source_heartbeat(source_id: "new-style").success).to be(false) # it is a processor
        expect(cp.call(:get_component_status, service_id: "new-style")[:status]).to eq(:HEALTH_STATUS_STOPPING)
        expect(registry.components.map { |x| [x.id, x.protocol] }).to eq([["old-style", :seed], ["new-style", :v1]])
      ensure
        seed&.close
      end

      it "refuses oversized registrations and a flood of unique ids past the cap" do
        small = CPV::Registry.new(janitor_interval: nil, limits: { max_components: 5, max_registration_bytes: 1024 })
        srv = small.serve(port: 0)
        other = klass.new(srv.port, time_limit(10))
        5.times { |i| expect(other.call(:register_component, component: processor("p#{i}"))[:service_id]).to eq("p#{i}") }
        expect(other.call(:register_component, component: processor("p5"))).to eq(RegistryFailed.new(8, "control plane full: 5 components registered (limit 5); unregister some first"))
        big = other.call(:register_component, component: processor("p0", metadata: { "k" => "v" * 2000 }))
        expect(big.code).to eq(3)
        expect(big.details).to match(/registration too large/)
        expect(other.call(:register_component, component: processor("p0"))[:service_id]).to eq("p0") # known ids still are
      ensure
        other&.close
        srv&.stop
        small&.close
      end
    end
  end

  it "numbers in seed metrics read as v1 strings without corruption (NaN, Infinity, integers, fractions)" do
    reg = CPV::Registry.method(:format_number)
    expect([Float::NAN, Float::INFINITY, -Float::INFINITY, 12.0, -3.0, 0.1, 1e20, 2.5e-7].map(&reg))
      .to eq(%w[NaN Infinity -Infinity 12 -3 0.1 1.0e+20 2.5e-07])
  end

  it "announces a wildcard host as this machine's hostname, and announce: as given" do
    expect(CPV::Registry.announced("0.0.0.0", 8080)).to eq("#{Socket.gethostname}:8080")
    expect(CPV::Registry.announced("::1", 8080)).to eq("[::1]:8080")
    other = CPV::Registry.new(janitor_interval: nil)
    srv = other.serve(port: 0, announce: "cp.example:443")
    reply = RegistryGemClient.new(srv.port, time_limit(10)).call(:register_component, component: processor("p1"))
    expect(reply[:connection_info]).to eq("control_plane_endpoint" => "cp.example:443")
  ensure
    srv&.stop
    other&.close
  end

  it "a status the v1 enum does not know reads back as its number" do
    client = RegistryGemClient.new(server.port, time_limit(10))
    client.call(:register_component, component: processor("p1"))
    client.call(:heartbeat, service_id: "p1", status: 9)
    expect(client.call(:get_component_status, service_id: "p1")[:status]).to eq(9)
    expect(registry.component("p1").status).to eq("9")
    seed = CPV::Client.new("127.0.0.1:#{server.port}", tls: false, timeout: time_limit(10))
    %w[running 4294967296 -1].each do |text| # seed statuses are free text: v1 reads what it cannot map as UNKNOWN
      seed.processor_heartbeat(processor_id: "p1", status: text)
      expect(client.call(:get_component_status, service_id: "p1")[:status]).to eq(:HEALTH_STATUS_UNKNOWN)
    end
    seed.close
  ensure
    client&.close
  end
end

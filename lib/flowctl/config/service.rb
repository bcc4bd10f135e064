# frozen_string_literal: true

require_relative "store"

module Flowctl
  module Config
    # The control plane's handler of flowctl.ext.v1.ConfigService (the gem's extension):
    # mount it next to flowctl.v1's ControlPlaneService on the same server.
    #
    #   config = Flowctl::Config::Service.new(Flowctl::Config::Store.new(db), acknowledged: ->(id) { ... })
    #   server.handle(Flowctl::Ext::V1::ConfigService, config)
    #
    # acknowledged: callable(component_id) -> the version the component last reported in
    # its heartbeat metrics ("config_version"), or nil.
    class Service
      ACK_KEY = "config_version"
      # How long one WatchConfig wait lasts before it looks whether the call is still wanted.
      WATCH_TICK = 0.5

      attr_reader :store

      def initialize(store = Store.new, acknowledged: nil)
        @store = store
        @acknowledged = acknowledged || ->(_id) {}
        @stopping = false
      end

      def declare_schema(request, _call = nil)
        raise InvalidArgument, "schema is required" if request.schema.nil?

        schema = begin
          Schema.from_proto(request.schema)
        rescue ArgumentError => e
          raise InvalidArgument, e.message
        end
        to_proto(request.component_id, @store.declare(request.component_id, schema))
      end

      def update_config(request, _call = nil)
        values = Config.decode_values(request.values)
        to_proto(request.component_id, @store.update(request.component_id, values, merge: request.merge,
                                                                               author: request.author, comment: request.comment))
      end

      def get_config(request, _call = nil)
        v = @store.get(request.component_id, request.version)
        raise NotFound, "component #{request.component_id.inspect} has no config version #{request.version}" if v.nil? && request.version.positive?

        to_proto(request.component_id, v)
      end

      def config_history(request, _call = nil)
        Flowctl::Ext::V1::ConfigHistoryResponse.new(versions: @store.history(request.component_id).map { |v| to_proto(v.component_id, v) })
      end

      def rollback_config(request, _call = nil)
        to_proto(request.component_id, @store.rollback(request.component_id, request.version, author: request.author))
      end

      # Server streaming: the current version at once (after after_version), then every
      # new one, until the client goes away or the server stops.
      def watch_config(request, call = nil)
        return enum_for(:watch_config, request, call) unless block_given?

        id = request.component_id
        raise InvalidArgument, "component_id is required" if id.empty?

        seen = request.after_version
        current = @store.get(id)
        if current && current.version > seen
          yield to_proto(id, current)
          seen = current.version
        end
        until @stopping || call&.cancelled?
          v = @store.wait_for(id, seen, WATCH_TICK) or next
          yield to_proto(id, @store.get(id)) # the newest, not each one in between
          seen = @store.get(id).version
        end
      end

      # Ends every WatchConfig stream (before the server stops).
      def stop
        @stopping = true
        @store.wake_all
      end

      private

      def to_proto(id, v)
        return Flowctl::Ext::V1::ConfigVersion.new(component_id: id, acknowledged_version: ack(id)) if v.nil?

        Flowctl::Ext::V1::ConfigVersion.new(component_id: id, version: v.version, values: Config.encode_values(v.values),
                                            created_at: v.created_at, author: v.author, comment: v.comment,
                                            acknowledged_version: ack(id))
      end

      def ack(id)
        Integer(@acknowledged.call(id) || 0, exception: false) || 0
      end
    end
  end
end
